"""Quotas through the REST API, on both stacks: creates fired at once from one project never
exceed its limits (the conductor counts and inserts in one step); what is over answers
413 ``overLimit``; ``/limits`` says what is in use. The operator sets a project's limits
with ``manage.py quota set``."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from troveclient.apiclient import exceptions

from dbaas import db
from dbaas.models import Instance

CREATE = {"instance": {"name": "db", "flavorRef": 1, "volume": {"size": 1}}}


def fire(count: int, send) -> list:
    """``send(n)`` from ``count`` threads released together; the responses."""
    barrier = threading.Barrier(count)

    def one(n):
        barrier.wait()
        return send(n)
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def over_limit(response, resource: str) -> bool:
    body = response.json()
    return (response.status_code == 413 and list(body) == ["overLimit"] and body["overLimit"]["code"] == 413
            and f"Quota exceeded for resources: ['{resource}']" in body["overLimit"]["message"])


def test_creates_fired_at_once_never_exceed_the_projects_quota(running, api):
    assert "alpha  instances  0 of 3 (own)" in running.ok("quota", "set", "alpha", "--instances", "3",
                                                         "--backups", "2")
    url = api.endpoint("alpha")
    responses = fire(12, lambda n: api.session("alice").post(f"{url}/instances", json=CREATE))
    created = [r for r in responses if r.status_code == 200]
    assert len(created) == 3, [r.text for r in responses]
    assert all(over_limit(r, "instances") for r in responses if r.status_code != 200)
    assert len(api.session("alice").get(f"{url}/instances").json()["instances"]) == 3
    # Another project's quota is its own.
    assert api.session("bob").post(api.endpoint("beta") + "/instances", json=CREATE).status_code == 200

    trove = api.trove(user="alice")
    with pytest.raises(exceptions.RequestEntityTooLarge, match=r"Quota exceeded .* \(HTTP 413\)"):
        trove.instances.create("one-more", "1", volume={"size": 1})
    absolute = trove.limits.list()[0]
    assert (absolute.verb, absolute.max_instances, absolute.instances_in_use,
            absolute.max_backups, absolute.backups_in_use) == ("ABSOLUTE", 3, 3, 2, 0)

    # Backups: of ACTIVE instances (arranged here), two at most.
    def work(session):
        for instance in session.query(Instance).filter_by(tenant_id="alpha"):
            instance.task_status, instance.service_status = "NONE", "running"
    db.run_transaction(work)
    ids = [r.json()["instance"]["id"] for r in created]
    responses = fire(8, lambda n: api.session("alice").post(
        f"{url}/backups", json={"backup": {"name": f"b{n}", "instance": ids[n % 3]}}))
    assert sorted(r.status_code for r in responses) == [202] * 2 + [413] * 6, [r.text for r in responses]
    assert all(over_limit(r, "backups") for r in responses if r.status_code == 413)

    # Deleting frees the quota once the instance is gone.
    assert "alpha  instances  3 of 4 (own)" in running.ok("quota", "set", "alpha", "--instances", "4")
    assert api.session("alice").post(f"{url}/instances", json=CREATE).status_code == 200
    assert "alpha  instances  4 of 10 (default)" in running.ok("quota", "set", "alpha", "--instances", "default")
