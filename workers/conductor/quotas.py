"""Per-project quotas, counted and enforced in the transaction that inserts (docs/adr/0006).

A create first locks its project's row in ``projects`` (made on first use). On PostgreSQL
concurrent creates of one project queue on that lock, and each counts only once the one
before it committed — READ COMMITTED gives every statement a fresh snapshot — so N
creates fired at once never exceed the limit. SQLite needs no row lock: every write
transaction begins with ``BEGIN IMMEDIATE`` (dbaas.db), which serialises writers whole.
Lock order everywhere: the project's row before any instance row.
"""

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dbaas import settings
from dbaas.errors import InvalidRequest, OverLimit
from dbaas.models import Backup, Instance, Project, utcnow

INSTANCES = "instances"
BACKUPS = "backups"
# resource -> (counted model, override column, default setting)
RESOURCES = {
    INSTANCES: (Instance, "max_instances", "quota_instances"),
    BACKUPS: (Backup, "max_backups", "quota_backups"),
}
MAX_PROJECT_ID_LENGTH = 64
# An override above this is a typo, not a quota (and must fit the column on any database).
MAX_LIMIT = 1_000_000


def validate_project(project_id) -> str:
    if not (isinstance(project_id, str) and 0 < len(project_id) <= MAX_PROJECT_ID_LENGTH
            and project_id.isprintable()):
        raise InvalidRequest(f"a project id is 1 to {MAX_PROJECT_ID_LENGTH} printable characters")
    return project_id


def lock(session: Session, project_id: str) -> Project:
    """The project's row, created if need be and locked until the transaction ends."""
    validate_project(project_id)
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(dialect.insert(Project).values(id=project_id, created=utcnow())
                    .on_conflict_do_nothing(index_elements=[Project.id]))
    return session.scalar(select(Project).where(Project.id == project_id).with_for_update()
                          .execution_options(populate_existing=True))


def limit_of(project: Project | None, resource: str) -> int:
    _model, column, default = RESOURCES[resource]
    override = getattr(project, column) if project is not None else None
    return getattr(settings.get(), default) if override is None else override


def in_use(session: Session, project_id: str, resource: str) -> int:
    model = RESOURCES[resource][0]
    return session.scalar(select(func.count()).select_from(model)
                          .where(model.tenant_id == project_id, model.deleted.is_(False)))


def check(session: Session, project: Project, resource: str) -> None:
    """Refuse one more ``resource`` when the project has its limit already; call with the
    project locked (``lock``), in the transaction that then inserts."""
    limit = limit_of(project, resource)
    used = in_use(session, project.id, resource)
    if used >= limit:
        raise OverLimit(f"Quota exceeded for resources: ['{resource}']: {used} of {limit} in use")


def show(session: Session, project_id) -> dict:
    validate_project(project_id)
    project = session.get(Project, project_id)
    return {"project_id": project_id,
            **{resource: {"limit": limit_of(project, resource),
                          "in_use": in_use(session, project_id, resource),
                          "default": getattr(project, RESOURCES[resource][1], None) is None}
               for resource in RESOURCES}}


def update(session: Session, project_id, limits: dict) -> dict:
    """Set the project's own limits: a number >= 0, or None for the configured default.
    Lowering a limit below what is in use removes nothing; it only refuses new ones."""
    unknown = set(limits) - RESOURCES.keys()
    if unknown:
        raise InvalidRequest(f"no quota for {sorted(map(str, unknown))[:5]}; there are {', '.join(RESOURCES)}")
    for resource, value in limits.items():
        if value is not None and not (type(value) is int and 0 <= value <= MAX_LIMIT):
            raise InvalidRequest(f"a quota is a whole number from 0 to {MAX_LIMIT}, or the default")
    project = lock(session, project_id)
    for resource, value in limits.items():
        setattr(project, RESOURCES[resource][1], value)
    session.flush()
    return show(session, project_id)
