"""The datastores on their own: real SQLite files, real PostgreSQL clusters."""

import sqlite3
from contextlib import closing

import psycopg2
import pytest

from workers.guestagent.datastores import datastore_for
from workers.guestagent.datastores.postgresql import PostgresqlDatastore, free_port, stop_cluster

ROWS = [(n, f"row {n}") for n in range(1, 201)]


@pytest.fixture(params=["sqlite", "postgresql"])
def kind(request):
    if request.param == "postgresql":
        request.getfixturevalue("postgres_programs")
    return request.param


def execute(datastore, sql: str) -> str:
    """Run *sql* as a client of the datastore would; the rows as psql -tA prints them."""
    if isinstance(datastore, PostgresqlDatastore):
        return datastore.query(sql)
    with closing(sqlite3.connect(datastore.connection_info()["path"])) as client, client:
        return "\n".join("|".join(map(str, row)) for row in client.execute(sql))


def fill(datastore) -> None:
    values = ", ".join(f"({n}, '{text}')" for n, text in ROWS)
    execute(datastore, "create table items (n integer primary key, text varchar(20))")
    execute(datastore, f"insert into items values {values}")


def contents(datastore) -> str:
    return execute(datastore, "select n, text from items order by n")


def test_backup_restores_into_another_data_dir(kind, guest_dir):
    original = datastore_for(kind, guest_dir / "original")
    assert original.prepare() is True
    assert original.probe()
    fill(original)
    dump = guest_dir / "dump"
    original.backup(str(dump))

    copy = datastore_for(kind, guest_dir / "copy")
    assert copy.prepare(restore_from=str(dump)) is True
    assert copy.probe()
    assert contents(copy) == contents(original) != ""


def test_prepare_again_keeps_the_data(kind, guest_dir):
    datastore = datastore_for(kind, guest_dir / "db")
    datastore.prepare()
    fill(datastore)
    before = contents(datastore)
    again = datastore_for(kind, guest_dir / "db")  # as a restarted agent would
    assert again.prepare() is False
    assert contents(again) == before


def test_an_interrupted_prepare_is_redone(kind, guest_dir):
    datastore = datastore_for(kind, guest_dir / "db")
    datastore.prepare()
    fill(datastore)
    # Crashed mid-prepare: the server (if any) still runs, and the marker says unprepared.
    (guest_dir / "db" / "datastore.json").write_text('{"prepared": false}')
    assert datastore.prepare() is True
    assert datastore.probe()
    assert execute(datastore, "select count(*) from sqlite_master" if kind == "sqlite"
                   else "select count(*) from pg_tables where tablename = 'items'") == "0"


def test_sqlite_probe_needs_a_database_file(guest_dir):
    datastore = datastore_for("sqlite", guest_dir / "db")
    assert not datastore.probe()
    assert not (guest_dir / "db" / "db.sqlite3").exists(), "a probe must not create the file"
    (guest_dir / "db").mkdir()
    (guest_dir / "db" / "db.sqlite3").write_text("not a database, just text " * 100)
    assert not datastore.probe()


def test_sqlite_restore_refuses_a_damaged_backup(guest_dir):
    damaged = guest_dir / "damaged"
    damaged.write_text("not a database, just text " * 100)
    with pytest.raises(sqlite3.DatabaseError):
        datastore_for("sqlite", guest_dir / "db").prepare(restore_from=str(damaged))


def test_postgresql_port_is_kept_and_a_left_server_adopted(postgres_programs, guest_dir):
    port = free_port()
    datastore = datastore_for("postgresql", guest_dir / "db")
    datastore.prepare(port=port)
    assert datastore.connection_info()["port"] == port
    postmaster = (datastore.pgdata / "postmaster.pid").read_text().split()[0]

    # A new agent (its predecessor SIGKILLed) finds the server still running: it adopts it.
    successor = datastore_for("postgresql", guest_dir / "db")
    successor.start()
    assert (successor.pgdata / "postmaster.pid").read_text().split()[0] == postmaster
    assert successor.probe()

    successor.stop()
    assert not successor.probe()
    successor.start()
    assert successor.connection_info()["port"] == port and successor.probe()

    stop_cluster(guest_dir / "db")  # a cluster whose agent is gone, stopped by hand
    assert not successor.probe()
    stop_cluster(guest_dir / "db")  # nothing running: nothing to do


def test_postgresql_without_a_port_picks_and_remembers_one(postgres_programs, guest_dir):
    datastore = datastore_for("postgresql", guest_dir / "db")
    datastore.prepare()
    port = datastore.connection_info()["port"]
    datastore.stop()
    assert datastore_for("postgresql", guest_dir / "db").prepare(port=port + 1) is False
    assert datastore.connection_info()["port"] == port and datastore.probe()


def login(datastore: PostgresqlDatastore, user: str, password: str | None) -> str:
    """Connect as a client on the host would: over TCP, with a password or none."""
    info = datastore.connection_info()
    try:
        with closing(psycopg2.connect(host=info["host"], port=info["port"], user=user, password=password,
                                      dbname=info["database"], connect_timeout=5)) as client:
            with client.cursor() as cursor:
                cursor.execute("select current_user")
                return cursor.fetchone()[0]
    except psycopg2.OperationalError as exc:
        return f"refused: {exc}"


def test_postgresql_asks_every_client_for_a_password(postgres_programs, guest_dir):
    datastore = PostgresqlDatastore(guest_dir / "db")
    datastore.prepare(admin_password="first-password")
    assert datastore.connection_info() == {"host": "127.0.0.1", "port": datastore.port, "user": "admin",
                                           "database": "postgres"}
    assert login(datastore, "admin", "first-password") == "admin"
    for user, password in (("admin", None), ("admin", "wrong"), ("postgres", None), ("postgres", "")):
        assert login(datastore, user, password).startswith("refused: "), (user, password)
    assert "password authentication failed" in login(datastore, "admin", "wrong")
    # The agent's own superuser password is the cluster's, owner-only, nowhere else.
    password_file = guest_dir / "db" / "superuser.pgpass"
    assert oct(password_file.stat().st_mode & 0o777) == "0o600"
    assert datastore.probe()

    datastore.set_admin_password("second-password")
    assert login(datastore, "admin", "second-password") == "admin"
    assert login(datastore, "admin", "first-password").startswith("refused: ")


def test_postgresql_restores_what_the_administrator_owns(postgres_programs, guest_dir):
    original = PostgresqlDatastore(guest_dir / "original")
    original.prepare(admin_password="secret")
    info = original.connection_info()
    with closing(psycopg2.connect(host=info["host"], port=info["port"], user="admin", password="secret",
                                  dbname="postgres")) as client, client, client.cursor() as cursor:
        cursor.execute("create table mine (value text); insert into mine values ('kept')")
    dump = guest_dir / "dump"
    original.backup(str(dump))
    copy = PostgresqlDatastore(guest_dir / "copy")
    copy.prepare(restore_from=str(dump), admin_password="other")
    assert copy.query("select tableowner || ':' || (select value from mine) from pg_tables "
                      "where tablename = 'mine'") == "admin:kept"
    assert login(copy, "admin", "other") == "admin"
