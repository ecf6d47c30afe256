"""``python -m workers.api``: the REST API on ``DBAAS_API_HOST``:``DBAAS_API_PORT``."""

import uvicorn

from dbaas import settings
from workers.api.app import create_app


def main() -> None:
    config = settings.get()
    uvicorn.run(create_app(config), host=config.api_host, port=config.api_port,
                log_level="info", proxy_headers=False)


if __name__ == "__main__":
    main()
