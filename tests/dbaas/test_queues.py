"""DBAAS_QUEUE_TYPE=quorum: every queue that outlives its consumers — the conductor's, the
control queue, the taskmanager's and each guest's command queue — is a RabbitMQ quorum
queue declared with the same arguments by everyone, and the whole system works on them:
a real guest agent is provisioned, reports, backs up and is deleted (with its queue).
On the shared RabbitMQ, in a vhost of the test's own (a single node holds quorum queues
too; tests/faults/test_rabbit_cluster.py runs them replicated over three)."""

from urllib.parse import quote, urlsplit

import pytest
import requests

from dbaas import db, migrations
from dbaas.queues import DELIVERY_LIMIT
from tests.support.services import AMQP_ADMIN_URL, wait_until
from tests.support.stack import Running, Stack, configure, instance_row

WAIT = ("--wait", "--timeout", "120", "--json")


@pytest.fixture
def quorum_stack(monkeypatch, tmp_path, env_for, postgres, rabbit):
    env = env_for(postgres.url, rabbit.url, DBAAS_QUEUE_TYPE="quorum")
    configure(monkeypatch, **{k: v for k, v in env.items() if k.startswith("DBAAS_")})
    migrations.upgrade()
    yield Stack("rabbitmq-postgresql", postgres.url, rabbit.url, env, tmp_path, postgres)
    db.engine().dispose()


def queues_of(vhost: str) -> dict[str, dict]:
    admin = urlsplit(AMQP_ADMIN_URL)
    response = requests.get(f"{admin.scheme}://{admin.hostname}:{admin.port}/api/queues/{quote(vhost, safe='')}",
                            auth=(admin.username, admin.password), timeout=30)
    response.raise_for_status()
    return {q["name"]: q for q in response.json()}


def test_quorum_queues_everywhere_and_a_guest_works_on_them(quorum_stack):
    vhost = urlsplit(quorum_stack.broker_url).path[1:]
    system = Running(quorum_stack, None).start()
    try:
        instance = system.ok("instance", "create", "quorum", *WAIT)
        assert instance["status"] == "ACTIVE"
        backup = system.ok("backup", "create", instance["id"], "nightly", *WAIT)
        assert backup["state"] == "COMPLETED"

        queues = queues_of(vhost)
        lasting = {name for name, q in queues.items() if not (q["auto_delete"] or q["exclusive"])}
        assert lasting == {"trove-conductor", "trove-conductor-control", "trove-taskmanager",
                           f"guestagent.{instance['id']}"}, sorted(queues)
        for name in lasting:
            assert queues[name]["type"] == "quorum", queues[name]
            assert queues[name]["arguments"] == {"x-queue-type": "quorum",
                                                 "x-delivery-limit": DELIVERY_LIMIT}, queues[name]
        # The rest are replies to calls and remote control: they die with their consumer.
        assert all(q["type"] == "classic" for name, q in queues.items() if name not in lasting)
        assert not any("delayed" in name for name in queues)  # no delayed-delivery topology

        system.ok("instance", "delete", instance["id"])
        wait_until(lambda: instance_row(instance["id"]).deleted, timeout=60, message="the instance deleted")
        assert f"guestagent.{instance['id']}" not in queues_of(vhost)
        for worker in (system.conductor, system.taskmanager):
            assert worker.process.poll() is None, worker.log()
        print(f"\nquorum queues: {', '.join(sorted(lasting))} (delivery limit {DELIVERY_LIMIT}); "
              f"{len(queues) - len(lasting)} transient classic queues")
    finally:
        system.stop()
