"""Running a process with an import guard (import_guard/sitecustomize.py): importing a
forbidden module fails in it, and every attempt — even one the process swallowed — is
written to a log the test reads."""

import os
from pathlib import Path

GUARD_DIR = Path(__file__).parent / "import_guard"
DATABASE_LAYER = "sqlalchemy,psycopg2,alembic,dbaas.db,dbaas.models,dbaas.migrations"


def guarded(env: dict, log: Path, forbidden: str = DATABASE_LAYER) -> dict:
    """``env`` for a process that must not load ``forbidden``; attempts go to ``log``."""
    return {**env, "PYTHONPATH": f"{GUARD_DIR}{os.pathsep}{env['PYTHONPATH']}",
            "DBAAS_TEST_FORBIDDEN_IMPORTS": forbidden, "DBAAS_TEST_IMPORT_LOG": str(log)}
