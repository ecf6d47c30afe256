"""Trove v1.0's paths, bodies, status codes and error bodies, as the clients read them:
what a create tolerates and refuses, pages, flavors, datastores, limits, versions, and
Trove's fault body for every error — never a framework's default."""

import uuid
from urllib.parse import parse_qs, urlsplit

import pytest

from dbaas import db
from dbaas.models import Instance

# Bodies and codes are made in the API process: one stack is enough (the lifecycle and
# quota tests run on both).
pytestmark = pytest.mark.parametrize("stack", ["rabbitmq-postgresql"], indirect=True)

CREATE = {"name": "db1", "flavorRef": 1, "volume": {"size": 1}}


def make_active(instance_id: str) -> None:
    """What the guest's first heartbeat does (arranged here in the database)."""
    def work(session):
        instance = session.get(Instance, instance_id)
        instance.task_status, instance.service_status = "NONE", "running"
    db.run_transaction(work)


def fault(response, status: int, name: str) -> str:
    """The message of Trove's fault body, after checking its shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == [name] and body[name]["code"] == status and isinstance(body[name]["message"], str), body
    return body[name]["message"]


def test_create_ignores_unknown_and_null_fields_and_refuses_what_is_not_offered(api):
    alice, url = api.session("alice"), api.endpoint("alpha") + "/instances"
    # What `openstack database instance create` sends besides, and more.
    response = alice.post(url, json={"instance": {
        **CREATE, "volume": {"size": 2, "type": None}, "access": {"is_public": False},
        "datastore": {"type": "sqlite", "version": None}, "nics": [{"network_id": "n1"}],
        "availability_zone": "az1", "locality": None, "databases": [], "replica_count": None,
        "something_new": {"x": 1}}, "also": "ignored"})
    assert response.status_code == 200, response.text
    created = response.json()["instance"]
    assert (created["status"], created["flavor"]["id"], created["volume"], created["datastore"]) == (
        "BUILD", "1", {"size": 2}, {"type": "sqlite", "version": "3"})
    assert created["links"][0] == {"href": f"{url}/{created['id']}", "rel": "self"}
    shown = alice.get(f"{url}/{created['id']}").json()["instance"]
    assert shown == created | {"updated": shown["updated"]}

    # Flavors by id (a number, a string, a link), datastores and versions by name or id.
    datastore = alice.get(api.endpoint("alpha") + "/datastores/postgresql").json()["datastore"]
    for spec in ({"flavorRef": "2"}, {"flavorRef": f"{api.endpoint('alpha')}/flavors/3"},
                 {"datastore": {"type": datastore["id"], "version": datastore["default_version"]}}):
        response = alice.post(url, json={"instance": {**CREATE, **spec}})
        assert response.status_code == 200, (spec, response.text)
    assert response.json()["instance"]["datastore"] == {"type": "postgresql", "version": "15"}

    for spec, words in [({"users": [{"name": "u", "password": "p"}]}, "not offered by this service: users"),
                        ({"replica_of": str(uuid.uuid4())}, "replica_of"),
                        ({"flavorRef": "small"}, "no flavor 'small'"),
                        ({"flavorRef": None}, "flavorRef"),
                        ({"volume": None}, "volume size is required"),
                        ({"volume": {"size": 0}}, "volume.size"),
                        ({"volume": {"size": 11}}, "volume size must be a whole number of GB from 1 to 10"),
                        ({"volume": {"size": 1.5}}, "volume.size"),
                        ({"datastore": {"type": "mysql"}}, "unknown datastore 'mysql'"),
                        ({"datastore": {"type": "sqlite", "version": "2"}}, "unknown version '2' of sqlite"),
                        ({"name": ""}, "name"), ({"name": "a\0b"}, "printable"),
                        ({"restorePoint": {"backupRef": None}}, "restorePoint.backupRef")]:
        message = fault(alice.post(url, json={"instance": {**CREATE, **spec}}), 400, "badRequest")
        assert words in message, (spec, message)
    fault(alice.post(url, json={"instance": {**CREATE, "restorePoint": {"backupRef": str(uuid.uuid4())}}}),
          404, "itemNotFound")
    for body in (b"", b"{", b"[]", b'{"instance": null}', b'{"instance": []}', b"\xff\xfe"):
        fault(alice.post(url, data=body, headers={"Content-Type": "application/json"}), 400, "badRequest")


def test_lists_come_in_pages_linked_by_marker(api, serve, running):
    alice, url = api.session("alice"), api.endpoint("alpha") + "/instances"
    made = [alice.post(url, json={"instance": {**CREATE, "name": f"db{n}"}}).json()["instance"]["id"]
            for n in range(5)]
    assert alice.get(api.endpoint("beta") + "/instances", auth=("bob", "bob-password")).json() == {
        "instances": [], "links": []}

    seen, page_url = [], f"{url}?limit=2&include_clustered=False"
    while page_url:
        body = alice.get(page_url).json()
        seen.append([i["id"] for i in body["instances"]])
        nexts = [link["href"] for link in body["links"] if link["rel"] == "next"]
        page_url = nexts[0] if nexts else None
        if page_url:
            query = parse_qs(urlsplit(page_url).query)
            assert query["marker"] == [seen[-1][-1]] and query["limit"] == ["2"]
    assert seen == [made[0:2], made[2:4], made[4:]]
    trove = api.trove(user="alice")
    first = trove.instances.list(limit=2)
    assert ([i.id for i in first], first.next) == (made[:2], made[1])
    assert [i.id for i in trove.instances.list(limit=2, marker=first.next)] == made[2:4]
    assert [i.id for i in trove.instances.list(detailed=True)] == made
    fault(alice.get(f"{url}?marker={uuid.uuid4()}"), 400, "badRequest")
    for bad in ("abc", "0", "-1"):
        fault(alice.get(f"{url}?limit={bad}"), 400, "badRequest")

    # The page size caps every page, asked for or not.
    small = serve(running, DBAAS_API_PAGE_SIZE="3")
    body = small.session("alice").get(small.endpoint("alpha") + "/instances?limit=50").json()
    assert len(body["instances"]) == 3 and body["links"][0]["rel"] == "next"


def test_actions_deletes_and_backups_answer_as_trove_does(api):
    alice, url = api.session("alice"), api.endpoint("alpha")
    instance_id = alice.post(f"{url}/instances", json={"instance": CREATE}).json()["instance"]["id"]

    # A backup of an instance still in BUILD: Trove's 422.
    message = fault(alice.post(f"{url}/backups", json={"backup": {"name": "b", "instance": instance_id}}),
                    422, "unprocessableEntity")
    assert "only an ACTIVE instance can be backed up" in message
    make_active(instance_id)
    for spec, words in [({"incremental": 1}, "incremental"), ({"parent_id": str(uuid.uuid4())}, "incremental"),
                        ({"restore_from": {"remote_location": "x"}}, "importing"),
                        ({"instance": None}, "backup.instance")]:
        body = {"backup": {"name": "b", "instance": instance_id, **spec}}
        assert words in fault(alice.post(f"{url}/backups", json=body), 400, "badRequest")
    response = alice.post(f"{url}/backups", json={"backup": {"name": "b", "incremental": 0, "instance": instance_id,
                                                              "description": "d", "swift_container": None}})
    assert response.status_code == 202, response.text
    backup = response.json()["backup"]
    assert (backup["status"], backup["instance_id"], backup["project_id"], backup["description"]) == (
        "NEW", instance_id, "alpha", "d")
    assert backup["datastore"]["type"] == "sqlite" and backup["datastore"]["version"] == "3"
    version = alice.get(f"{url}/datastores/versions/{backup['datastore']['version_id']}").json()["version"]
    sqlite = alice.get(f"{url}/datastores/sqlite").json()["datastore"]
    assert (version["name"], version["datastore"]) == ("3", sqlite["id"])
    assert alice.get(f"{url}/backups?datastore=sqlite").json()["backups"][0]["id"] == backup["id"]
    assert alice.get(f"{url}/backups?datastore=postgresql").json()["backups"] == []
    assert "wait until it is COMPLETED" in fault(alice.delete(f"{url}/backups/{backup['id']}"), 422,
                                                 "unprocessableEntity")

    for body in ({"restart": {}}, {"reset_status": {}}):
        response = alice.post(f"{url}/instances/{instance_id}/action", json=body)
        assert (response.status_code, response.content) == (202, b"")
    for body in ({}, {"resize": {"flavorRef": 2}}, {"restart": {}, "reset_status": {}}, {"restart": None}):
        assert "exactly one action" in fault(alice.post(f"{url}/instances/{instance_id}/action", json=body),
                                             400, "badRequest")
    response = alice.delete(f"{url}/instances/{instance_id}")
    assert (response.status_code, response.content) == (202, b"")
    assert alice.get(f"{url}/instances/{instance_id}").json()["instance"]["status"] == "SHUTDOWN"


def test_errors_are_troves_fault_bodies(api, serve, running):
    alice, url = api.session("alice"), api.endpoint("alpha")
    assert fault(alice.get(f"{url}/no/such/thing"), 404, "itemNotFound") == "The resource could not be found."
    fault(alice.put(f"{url}/instances"), 405, "badMethod")
    fault(alice.patch(f"{url}/flavors/1"), 405, "badMethod")
    fault(alice.get(f"{url}/instances/{uuid.uuid4()}"), 404, "itemNotFound")

    small = serve(running, DBAAS_API_MAX_BODY_BYTES="1024")
    alice, url = small.session("alice"), small.endpoint("alpha")
    large = {"instance": {**CREATE, "padding": "x" * 2000}}
    assert "larger than 1024 bytes" in fault(alice.post(f"{url}/instances", json=large), 413, "overLimit")
    chunked = (chunk for chunk in [b'{"instance": {"name": "', b"x" * 2000, b'"}}'])  # no Content-Length
    fault(alice.post(f"{url}/instances", data=chunked, headers={"Content-Type": "application/json"}),
          413, "overLimit")
    assert alice.post(f"{url}/instances", json={"instance": CREATE}).status_code == 200

    # A conductor that does not answer: 503, still Trove's body.
    running.conductor.stop()
    slow = serve(running, DBAAS_CALL_TIMEOUT="1")
    assert "no conductor answered" in fault(slow.session("alice").get(slow.endpoint("alpha") + "/instances"),
                                            503, "serviceUnavailable")


def test_what_is_offered_flavors_datastores_limits_versions(running, serve):
    api = serve(running, DBAAS_API_FLAVORS="db.small:small:512:1:1,10:big:8192:4:40")
    alice, url = api.session("alice"), api.endpoint("alpha")
    assert alice.get(api.url + "/").json()["versions"][0] | {"links": None} == {
        "id": "v1.0", "status": "CURRENT", "updated": "2012-08-01T00:00:00Z", "links": None}
    assert alice.get(api.url + "/v1.0/").json()["version"]["id"] == "v1.0"

    flavors = alice.get(f"{url}/flavors").json()["flavors"]
    assert [(f["id"], f["str_id"], f["name"], f["ram"], f["vcpus"], f["disk"]) for f in flavors] == [
        (None, "db.small", "small", 512, 1, 1), (10, "10", "big", 8192, 4, 40)]
    assert alice.get(f"{url}/flavors/db.small").json()["flavor"]["str_id"] == "db.small"
    fault(alice.get(f"{url}/flavors/1"), 404, "itemNotFound")
    trove = api.trove(user="alice")
    assert [f.id for f in trove.flavors.list()] == ["db.small", 10]  # str_id where id is null
    listed = api.openstack_json("database", "flavor", "list", user="alice")
    assert [(f["ID"], f["Name"]) for f in listed] == [("db.small", "small"), (10, "big")]
    created = api.openstack_json("database", "instance", "create", "db1", "--flavor", "small", "--size", "1",
                                 user="alice")
    assert created["flavor"] == "db.small"

    datastores = alice.get(f"{url}/datastores").json()["datastores"]
    assert [d["name"] for d in datastores] == ["sqlite", "postgresql"]
    for datastore in datastores:
        assert datastore["default_version"] in [v["id"] for v in datastore["versions"]]
        assert alice.get(f"{url}/datastores/{datastore['id']}").json()["datastore"] == datastore
    versions = alice.get(f"{url}/datastores/postgresql/versions").json()["versions"]
    assert [(v["name"], v["version"]) for v in versions] == [("15", "15")]
    assert alice.get(f"{url}/datastores/postgresql/versions/15").json()["version"] == versions[0]
    assert alice.get(f"{url}/datastores/postgresql/versions/{versions[0]['id']}").json()["version"] == versions[0]
    assert len(alice.get(f"{url}/datastores/sqlite/versions/3/flavors").json()["flavors"]) == 2
    for path in ("/datastores/mysql", "/datastores/sqlite/versions/9", f"/datastores/versions/{uuid.uuid4()}"):
        fault(alice.get(url + path), 404, "itemNotFound")
    assert [d["Name"] for d in api.openstack_json("datastore", "list", user="alice")] == ["sqlite", "postgresql"]
    assert api.openstack_json("datastore", "version", "show", "15", "--datastore", "postgresql",
                              user="alice")["name"] == "15"

    assert alice.get(f"{url}/limits").json() == {"limits": [{
        "verb": "ABSOLUTE", "max_instances": 10, "instances_in_use": 1, "max_backups": 50,
        "backups_in_use": 0}]}
    assert api.openstack("database", "limit", "list", user="alice").returncode == 0
