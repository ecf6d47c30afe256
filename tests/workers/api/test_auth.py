"""Who may do what through the REST API: credentials (HTTP basic, X-Auth-Token) and their
project; another project's instance or backup reads exactly like a missing one; an admin
acts for any project and lists all of them. The API process runs as in the Procfile, in
front of a real conductor and taskmanager (guests that run and do nothing); this process
arranges states (ACTIVE, COMPLETED) in the database directly."""

import base64
import subprocess
import sys
import uuid

import pytest
from troveclient.apiclient import exceptions

from dbaas import db
from dbaas.models import Backup, Instance
from tests.support.services import ROOT, wait_until

# What is checked here happens in the API process and in SQL that is the same on both
# databases; the quota and lifecycle tests run on both stacks.
pytestmark = pytest.mark.parametrize("stack", ["rabbitmq-postgresql"], indirect=True)

ALICE_TOKEN = "alpha-token-0123456789abcdef"
CREATE = {"instance": {"name": "db1", "flavorRef": 1, "volume": {"size": 1}}}


def arrange(model, object_id: str, **fields) -> None:
    def work(session):
        row = session.get(model, object_id)
        for name, value in fields.items():
            setattr(row, name, value)
    db.run_transaction(work)


def unauthorized(response) -> bool:
    return response.status_code == 401 and response.json() == {"unauthorized": {
        "code": 401, "message": "Authentication required: HTTP basic or X-Auth-Token."}}


def test_no_or_bad_credentials_are_refused(api):
    instances = api.endpoint("alpha") + "/instances"
    anonymous = api.session()
    response = anonymous.get(instances)
    assert unauthorized(response) and response.headers["WWW-Authenticate"] == 'Basic realm="dbaas"'
    for headers in ({"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()},
                    {"Authorization": "Basic " + base64.b64encode(b"mallory:alice-password").decode()},
                    {"Authorization": "Basic " + base64.b64encode(b"alice").decode()},
                    {"Authorization": "Basic not base64!"},
                    {"Authorization": "Bearer " + ALICE_TOKEN},
                    {"X-Auth-Token": "notused"},  # what keystoneauth's noauth plugin sends
                    {"X-Auth-Token": ALICE_TOKEN + "x"}):
        assert unauthorized(anonymous.get(instances, headers=headers)), headers
    # Before routing and before the body: nothing is learnt, nothing is read.
    assert unauthorized(anonymous.get(api.endpoint("alpha") + "/no/such/path"))
    assert unauthorized(anonymous.post(instances, data=b"x" * 10_000_000))
    assert unauthorized(anonymous.get(api.endpoint("not a project") + "/instances"))
    # What needs no project needs no credentials.
    assert anonymous.get(api.url + "/").json()["versions"][0]["id"] == "v1.0"
    assert anonymous.get(api.url + "/openapi.json").status_code == 200

    from keystoneauth1 import noauth, session
    from troveclient.v1 import client
    noauth_client = client.Client(session=session.Session(auth=noauth.NoAuth(endpoint=api.endpoint("alpha"))))
    with pytest.raises(exceptions.Unauthorized):
        noauth_client.instances.list()


def test_a_user_and_a_token_of_one_project_see_the_same(api):
    created = api.session("alice").post(api.endpoint("alpha") + "/instances", json=CREATE).json()["instance"]
    by_token = api.trove(token=ALICE_TOKEN)
    assert [i.id for i in by_token.instances.list()] == [created["id"]]
    assert by_token.instances.get(created["id"]).name == "db1"
    assert not hasattr(by_token.instances.get(created["id"]), "tenant_id")  # admins only


def not_found_bodies(api, user: str, project: str, requests_of) -> tuple:
    """The answers to the same requests about an object of another project and about an id
    nobody has, each with its id blanked: they must be equal."""
    session = api.session(user)
    answers = []
    for object_id in requests_of:
        responses = []
        for method, path, body in requests_of[object_id]:
            response = session.request(method, api.endpoint(project) + path, json=body)
            responses.append((response.status_code, response.headers["content-type"],
                              response.text.replace(object_id, "ID")))
        answers.append(responses)
    return tuple(answers)


def test_another_projects_objects_read_exactly_like_missing_ones(api):
    alice, bob = api.session("alice"), api.session("bob")
    instance_id = alice.post(api.endpoint("alpha") + "/instances", json=CREATE).json()["instance"]["id"]
    arrange(Instance, instance_id, task_status="NONE", service_status="running")
    backup = alice.post(api.endpoint("alpha") + "/backups",
                        json={"backup": {"name": "nightly", "instance": instance_id}})
    assert backup.status_code == 202, backup.text
    backup_id = backup.json()["backup"]["id"]
    arrange(Backup, backup_id, state="COMPLETED", location="file:///nowhere")

    def instance_requests(object_id):
        return [("GET", f"/instances/{object_id}", None), ("DELETE", f"/instances/{object_id}", None),
                ("POST", f"/instances/{object_id}/action", {"restart": {}}),
                ("POST", f"/instances/{object_id}/action", {"reset_status": {}}),
                ("GET", f"/instances/{object_id}/backups", None),
                ("GET", f"/backups?instance_id={object_id}", None),
                ("POST", "/backups", {"backup": {"name": "b", "instance": object_id}})]

    def backup_requests(object_id):
        return [("GET", f"/backups/{object_id}", None), ("DELETE", f"/backups/{object_id}", None),
                ("POST", "/instances", {"instance": {**CREATE["instance"], "restorePoint": {"backupRef": object_id}}})]

    missing = str(uuid.uuid4())
    for requests_of in ({instance_id: instance_requests(instance_id), missing: instance_requests(missing)},
                        {backup_id: backup_requests(backup_id), missing: backup_requests(missing)}):
        theirs, nobodys = not_found_bodies(api, "bob", "beta", requests_of)
        assert theirs == nobodys
        assert {status for status, _type, _text in theirs} == {404}
        assert {content_type for _status, content_type, _text in theirs} == {"application/json"}
    assert bob.get(api.endpoint("beta") + "/instances").json() == {"instances": [], "links": []}
    assert bob.get(api.endpoint("beta") + "/backups").json() == {"backups": [], "links": []}
    # Nothing of alice's changed: bob's delete and restart did nothing.
    assert alice.get(api.endpoint("alpha") + f"/instances/{instance_id}").json()["instance"]["status"] == "ACTIVE"

    # Under alice's project in the URL, bob is refused outright; so is a list of all projects.
    refused = bob.get(api.endpoint("alpha") + f"/instances/{instance_id}")
    assert refused.status_code == 403 and refused.json()["forbidden"]["code"] == 403
    for path in ("/instances?all_projects=true", "/backups?all_projects=True", "/mgmt/instances"):
        assert bob.get(api.endpoint("beta") + path).status_code == 403, path


def test_an_admin_acts_for_any_project_and_lists_them_all(api):
    alice, bob, root = api.session("alice"), api.session("bob"), api.session("root")
    alices = alice.post(api.endpoint("alpha") + "/instances", json=CREATE).json()["instance"]["id"]
    bobs = bob.post(api.endpoint("beta") + "/instances", json=CREATE).json()["instance"]["id"]
    assert root.get(api.endpoint("ops") + "/instances").json()["instances"] == []
    everyone = root.get(api.endpoint("ops") + "/instances?all_projects=true").json()["instances"]
    assert {(i["id"], i["tenant_id"]) for i in everyone} == {(alices, "alpha"), (bobs, "beta")}
    assert root.get(api.endpoint("alpha") + f"/instances/{alices}").json()["instance"]["tenant_id"] == "alpha"
    assert root.get(api.endpoint("alpha") + f"/instances/{bobs}").status_code == 404

    # openstack database instance list --all-projects [--project-id P]: the mgmt listing.
    listed = api.openstack_json("database", "instance", "list", "--all-projects", user="root")
    assert {(i["ID"], i["Tenant ID"]) for i in listed} == {(alices, "alpha"), (bobs, "beta")}
    listed = api.openstack_json("database", "instance", "list", "--project-id", "beta", user="root")
    assert [i["ID"] for i in listed] == [bobs]
    assert root.delete(api.endpoint("beta") + f"/instances/{bobs}").status_code == 202


def test_ids_that_cannot_exist_are_not_found(api):
    root = api.session("root")
    for path in ["/v1.0/bad project/instances", "/v1.0/" + "p" * 65 + "/instances",
                 "/v1.0/%00/instances", "/v1.0/-leading-dash/flavors",
                 "/v1.0/alpha/instances/not-a-uuid", "/v1.0/alpha/instances/%00",
                 "/v1.0/alpha/instances/" + str(uuid.uuid4()).upper(),
                 "/v1.0/alpha/instances/" + "x" * 5000, "/v1.0/alpha/backups/' OR 1=1 --",
                 "/v1.0/alpha/instances/" + str(uuid.uuid4()) + "/backups"]:
        response = root.get(api.url + path)
        assert response.status_code == 404, (path, response.text)
        assert list(response.json()) == ["itemNotFound"], path


def test_the_credentials_file_is_read_again_when_it_changes(running, serve, tmp_path):
    path = tmp_path / "credentials.json"
    api = serve(running, DBAAS_API_CREDENTIALS="", DBAAS_API_CREDENTIALS_FILE=str(path))

    def manage(*args: str) -> str:
        result = subprocess.run([sys.executable, "manage.py", "credentials", *args], cwd=ROOT,
                                env={**running.client_env, "DBAAS_API_CREDENTIALS_FILE": str(path)},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    carol = api.session()
    carol.auth = ("carol", manage("add-user", "carol", "--project", "gamma"))
    assert carol.get(api.endpoint("gamma") + "/instances").status_code == 200
    token = manage("add-token", "deploy", "--project", "gamma")
    assert api.session(token=token).get(api.endpoint("gamma") + "/instances").status_code == 200
    assert manage("list") == "user   carol                     gamma\ntoken  deploy                    gamma"
    assert token not in path.read_text() and carol.auth[1] not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    manage("remove", "carol")
    wait_until(lambda: carol.get(api.endpoint("gamma") + "/instances").status_code == 401, timeout=10,
               message="carol refused")
    path.write_text("{not json")  # a broken edit keeps what was in force
    assert api.session(token=token).get(api.endpoint("gamma") + "/instances").status_code == 200
    path.unlink()
    assert api.session(token=token).get(api.endpoint("gamma") + "/instances").status_code == 401
