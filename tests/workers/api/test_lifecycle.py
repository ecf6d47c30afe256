"""Tenants' own clients, unmodified, drive the whole life of an instance through the REST API
— create, ACTIVE, backup, COMPLETED, restore into a new instance, delete — against the
real API process, conductor, taskmanager and guest agents, on RabbitMQ + PostgreSQL and on
the embedded default: python-troveclient on a keystoneauth1 session (HTTP basic), and
``openstack database …`` (a token)."""

import os
import signal
import socket
import time
from contextlib import closing

import psycopg2

from tests.support.services import wait_until
from tests.support.stack import processes_of

TIMEOUT = 180


def settled(read, object_id: str, field: str, wanted: str, failed: str):
    """Poll ``read(object_id)`` until ``field`` is ``wanted``; fail at once on ``failed``."""
    def check():
        current = read(object_id)
        value = current[field] if isinstance(current, dict) else getattr(current, field)
        assert value != failed, f"{object_id} is {failed}: {current}"
        return current if value == wanted else None
    return wait_until(check, timeout=TIMEOUT, interval=1, message=f"{object_id} {wanted}")


def test_troveclient_drives_an_instance_from_create_to_delete(start, serve):
    api = serve(start(None))
    trove = api.trove(user="alice")

    created = trove.instances.create("db1", "1", volume={"size": 1}, datastore="sqlite",
                                     datastore_version="3")
    assert created.status == "BUILD"
    active = settled(trove.instances.get, created.id, "status", "ACTIVE", "ERROR")
    assert (active.flavor["id"], active.volume, active.datastore) == (
        "1", {"size": 1}, {"type": "sqlite", "version": "3"})
    assert [i.id for i in trove.instances.list()] == [created.id]

    # Reads come from the conductor's records: a guest that answers nothing delays nothing.
    guests = processes_of(created.id)
    for pid in guests:
        os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        assert trove.instances.get(created.id).status == "ACTIVE"
        assert len(trove.instances.list()) == 1
        assert time.monotonic() - began < 2
    finally:
        for pid in guests:
            os.kill(pid, signal.SIGCONT)

    backup = trove.backups.create("nightly", created.id, description="before the copy")
    assert (backup.status, backup.instance_id, backup.datastore["type"]) == ("NEW", created.id, "sqlite")
    completed = settled(trove.backups.get, backup.id, "status", "COMPLETED", "FAILED")
    assert completed.size > 0 and completed.description == "before the copy"
    assert [b.id for b in trove.instances.backups(created.id)] == [backup.id]
    assert [b.id for b in trove.backups.list(instance_id=created.id)] == [backup.id]

    copy = trove.instances.create("copy", 2, volume={"size": 2}, restorePoint={"backupRef": backup.id})
    copied = settled(trove.instances.get, copy.id, "status", "ACTIVE", "ERROR")
    assert (copied.datastore["type"], copied.flavor["id"], copied.volume["size"]) == ("sqlite", "2", 2)

    trove.instances.restart(created.id)
    for instance_id in (copy.id, created.id):
        trove.instances.delete(instance_id)
    wait_until(lambda: trove.instances.list() == [], timeout=TIMEOUT, interval=1, message="both deleted")
    assert [b.id for b in trove.backups.list()] == [backup.id]  # backups outlive their instance
    trove.backups.delete(backup.id)
    wait_until(lambda: trove.backups.list() == [], timeout=60, interval=1, message="the backup deleted")


def test_the_openstack_cli_drives_an_instance_from_create_to_delete(reachable_var_dir, start, serve):
    """On PostgreSQL guests, whose address (ip, port) the API gives; names are looked up
    as osc-lib does (a GET by name, its 404, then the list)."""
    api = serve(start(None))
    token = {"token": "alpha-token-0123456789abcdef"}

    def show(kind: str, name: str) -> dict:
        return api.openstack_json("database", kind, "show", name, **token)

    created = api.openstack_json("database", "instance", "create", "db1", "--flavor", "small",
                                 "--size", "1", "--datastore", "postgresql",
                                 "--datastore-version", "15", **token)
    assert created["status"] == "BUILD"
    active = settled(lambda name: show("instance", name), "db1", "status", "ACTIVE", "ERROR")
    assert (active["datastore"], active["datastore_version"], active["flavor"], active["volume"]) == (
        "postgresql", "15", "1", 1)
    socket.create_connection((active["ip"], active["port"]), timeout=10).close()  # the server is there
    assert show("instance", "db1")["connection"] == {
        "host": active["ip"], "port": active["port"], "user": "admin", "database": "postgres"}

    # Trove's root-enable: a new administrator password, with which a real client logs in.
    assert api.openstack_json("database", "root", "show", "db1", **token)["is_root_enabled"] is True
    root = api.openstack_json("database", "root", "enable", "db1", **token)
    assert root["name"] == "admin" and len(root["password"]) >= 16

    def logs_in():
        try:
            with closing(psycopg2.connect(host=active["ip"], port=active["port"], user=root["name"],
                                          password=root["password"], dbname="postgres",
                                          connect_timeout=5)) as client, client.cursor() as cursor:
                cursor.execute("select current_user")
                return cursor.fetchone()[0]
        except psycopg2.OperationalError:
            return None  # the guest has not set the new password yet
    assert wait_until(logs_in, timeout=60, interval=1, message="a login with the new password") == "admin"
    refused = api.openstack("database", "root", "enable", "db1", "--root_password", "chosen-by-me", **token)
    assert refused.returncode != 0 and "generated" in refused.stderr
    root["password"] = "not-" + root["password"]
    assert logs_in() is None  # PostgreSQL asks for the password
    listed = api.openstack_json("database", "instance", "list", **token)
    assert [(i["Name"], i["Status"], i["Datastore"]) for i in listed] == [("db1", "ACTIVE", "postgresql")]

    backup = api.openstack_json("database", "backup", "create", "nightly", "--instance", "db1", **token)
    assert backup["status"] == "NEW"
    settled(lambda name: show("backup", name), "nightly", "status", "COMPLETED", "FAILED")

    api.openstack_json("database", "instance", "create", "copy", "--flavor", "1", "--size", "1",
                       "--backup", "nightly", **token)
    copy = settled(lambda name: show("instance", name), "copy", "status", "ACTIVE", "ERROR")
    assert copy["port"] != active["port"]
    socket.create_connection((copy["ip"], copy["port"]), timeout=10).close()

    deleted = api.openstack("database", "instance", "delete", "db1", "copy", **token)
    assert deleted.returncode == 0, deleted.stderr
    wait_until(lambda: api.openstack_json("database", "instance", "list", **token) == [],
               timeout=TIMEOUT, interval=1, message="both deleted")
    assert api.openstack("database", "backup", "delete", "nightly", **token).returncode == 0
    wait_until(lambda: api.openstack_json("database", "backup", "list", **token) == [],
               timeout=60, interval=1, message="the backup deleted")

