"""``python -m workers.api``: the REST API on ``DBAAS_API_HOST``:``DBAAS_API_PORT``."""

import sys

import uvicorn

from dbaas import settings
from workers.api.app import create_app
from workers.api.credentials import CredentialError


def main() -> int:
    try:
        config = settings.get()
        app = create_app(config)
    except (settings.SettingError, CredentialError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=config.api_host, port=config.api_port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
