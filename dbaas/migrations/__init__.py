"""Alembic migrations; ``python manage.py db upgrade`` applies them."""

from alembic import command
from alembic.config import Config

from dbaas.settings import PROJECT_ROOT


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(PROJECT_ROOT / "dbaas" / "migrations"))
    return config


def upgrade(revision: str = "head") -> None:
    command.upgrade(alembic_config(), revision)


def current() -> None:
    command.current(alembic_config(), verbose=False)
