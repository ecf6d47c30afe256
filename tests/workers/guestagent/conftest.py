import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.services import unavailable
from workers.guestagent.datastores import postgresql


@pytest.fixture
def guest_dir():
    """A directory for guests' data_dirs that the ``postgres`` OS user can reach (pytest's
    tmp_path is private to the user running the tests). Any PostgreSQL server left in it
    is stopped afterwards."""
    path = Path(tempfile.mkdtemp(prefix="dbaas-guest-"))
    path.chmod(0o711)
    yield path
    for data_dir in path.iterdir():
        postgresql.stop_cluster(data_dir)
    shutil.rmtree(path)


@pytest.fixture
def postgres_programs():
    try:
        return postgresql.bin_dir()
    except FileNotFoundError as exc:
        unavailable("PostgreSQL server programs", exc)
