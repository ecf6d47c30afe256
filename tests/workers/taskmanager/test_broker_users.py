"""A guest holds no power at the broker: with a real guest's own RabbitMQ credentials, taken
from the config the taskmanager wrote, every attempt beyond publishing to the conductor and
reading its own commands is refused by RabbitMQ, and nothing in the control plane changes.
After the instance is deleted its credentials no longer connect."""

import json
import re
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import amqp
import pytest
import requests
from kombu import Connection, Exchange, Producer, Queue

from dbaas import wire
from dbaas.queues import queue
from tests.support.services import AMQP_ADMIN_URL, wait_until
from tests.support.stack import instance_row, snapshot
from workers.guestagent.client import build_message

pytestmark = pytest.mark.parametrize("stack", ["rabbitmq-postgresql"], indirect=True)


@pytest.fixture
def running(start):
    """With real guest agents."""
    return start(None)

REFUSED = (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed,
           amqp.exceptions.PreconditionFailed, amqp.exceptions.ConnectionForced)


def admin(path: str):
    base, credentials = AMQP_ADMIN_URL.split("://", 1)[1].split("@", 1)[1], \
        tuple(AMQP_ADMIN_URL.split("://", 1)[1].split("@", 1)[0].split(":"))
    response = requests.get(f"http://{base}/api/{path}", auth=credentials, timeout=10)
    return response.status_code, (response.json() if response.ok else None)


def guest_config(running, instance_id: str) -> dict:
    return json.loads((Path(running.env["DBAAS_VAR_DIR"]) / "instances" / instance_id / "guest.json").read_text())


def queue_depths(running) -> dict:
    vhost = quote(running.stack.broker_url.rsplit("/", 1)[1], safe="")
    status, queues = admin(f"queues/{vhost}")
    assert status == 200
    return {q["name"]: q.get("messages", 0) for q in queues if not q["name"].startswith("celery")}


def refused(action) -> bool:
    try:
        action()
    except REFUSED:
        return True
    return False


def test_each_guest_has_a_user_of_its_own_with_literal_permissions(running):
    instance_id = running.ok("instance", "create", "db1", "--wait", "--timeout", "120", "--json")["id"]
    user = wire.guest_broker_user(instance_id)
    config = guest_config(running, instance_id)
    assert config["broker_url"].startswith(f"amqp://{user}:")
    assert "guest:guest" not in json.dumps(config)

    vhost = running.stack.broker_url.rsplit("/", 1)[1]
    status, permissions = admin(f"permissions/{quote(vhost, safe='')}/{quote(user, safe='')}")
    assert status == 200
    assert (permissions["configure"], permissions["write"], permissions["read"]) == \
        ("^$", f"^{re.escape('trove-conductor')}$", f"^{re.escape(f'guestagent.{instance_id}')}$")
    status, limits = admin(f"user-limits/{quote(user, safe='')}")
    assert status == 200 and limits[0]["value"] == {"max-connections": 3, "max-channels": 8}


def test_a_guests_credentials_can_do_nothing_else(running):
    victim = running.ok("instance", "create", "victim", "--wait", "--timeout", "120", "--json")["id"]
    attacker = running.ok("instance", "create", "attacker", "--wait", "--timeout", "120", "--json")["id"]
    url = guest_config(running, attacker)["broker_url"]
    before_rows, before_queues = snapshot(), queue_depths(running)
    conductor_queue = queue("trove-conductor")
    victim_queue = Queue(f"guestagent.{victim}", Exchange("guestagent", type="direct"), routing_key=victim,
                         durable=True, no_declare=True)

    def attempt(work):
        with Connection(url, transport_options={"confirm_publish": True}) as connection:
            work(connection.channel())

    def publish(channel, exchange: str, routing_key: str, **properties):
        message = build_message(victim, "0" * 64, 1, wire.HEARTBEAT_TASK, [victim, {}, time.time()])
        Producer(channel, auto_declare=False).publish(exchange=exchange, routing_key=routing_key,
                                                      **{**message, **properties})

    attacks = {
        "consume the conductor's queue": lambda ch: ch.basic_consume("trove-conductor", callback=print),
        "get from the conductor's queue": lambda ch: ch.basic_get("trove-conductor"),
        "purge the conductor's queue": lambda ch: ch.queue_purge("trove-conductor"),
        "delete the conductor's queue": lambda ch: ch.queue_delete("trove-conductor"),
        "consume another guest's commands": lambda ch: ch.basic_consume(f"guestagent.{victim}", callback=print),
        "publish into another guest's queue": lambda ch: publish(ch, "guestagent", victim),
        "publish through amq.default": lambda ch: publish(ch, "", f"guestagent.{victim}"),
        "publish to the control queue": lambda ch: publish(ch, "trove-conductor-control", "trove-conductor-control"),
        "declare a queue": lambda ch: ch.queue_declare(f"mine-{uuid.uuid4().hex}"),
        "declare an exchange": lambda ch: ch.exchange_declare(f"mine-{uuid.uuid4().hex}", "fanout"),
        "redeclare the conductor's queue": lambda ch: conductor_queue(ch).declare(),
        "bind another guest's queue": lambda ch: victim_queue(ch).bind_to("guestagent", routing_key=attacker),
        "publish as another instance's user": lambda ch: publish(ch, "trove-conductor", "trove-conductor",
                                                                 user_id=wire.guest_broker_user(victim)),
    }
    for what, work in attacks.items():
        assert refused(lambda: attempt(work)), f"RabbitMQ allowed: {what}"

    # Publishing to the conductor works, but a message signed with the attacker's own key
    # and sent without user_id is refused by the conductor: RabbitMQ did not vouch for it.
    secret = guest_config(running, attacker)["secret"]
    with Connection(url, transport_options={"confirm_publish": True}) as connection:
        message = build_message(attacker, secret, 1, wire.HEARTBEAT_TASK,
                                [attacker, {"service_status": "shutdown"}, time.time()])
        Producer(connection.channel(), auto_declare=False).publish(
            exchange="trove-conductor", routing_key="trove-conductor", **message)
    wait_until(lambda: "the broker does not vouch for the sender" in running.conductor.log(),
               timeout=30, message="the conductor refusing a message RabbitMQ did not vouch for")

    # More connections than the user's limit: refused.
    connections = []
    try:
        with pytest.raises(REFUSED):
            for _ in range(10):
                connection = Connection(url)
                connection.connect()
                connections.append(connection)
    finally:
        for connection in connections:
            connection.release()

    assert instance_row(victim).last_heartbeat is not None  # its own guest still beats
    after_rows = [r for r in snapshot() if r.get("id") not in (victim, attacker) and r.get("key") not in (victim, attacker)]
    assert after_rows == [r for r in before_rows if r.get("id") not in (victim, attacker)
                          and r.get("key") not in (victim, attacker)]
    assert queue_depths(running).keys() == before_queues.keys()


def test_after_delete_the_guests_credentials_no_longer_connect(running):
    instance_id = running.ok("instance", "create", "db1", "--wait", "--timeout", "120", "--json")["id"]
    url = guest_config(running, instance_id)["broker_url"]
    with Connection(url) as connection:
        connection.connect()  # they work while the instance lives
    running.ok("instance", "delete", instance_id)
    wait_until(lambda: running.ok("instance", "list", "--json") == [], timeout=60, message="deleted")
    with pytest.raises(REFUSED):
        with Connection(url, connect_timeout=5) as connection:
            connection.connect()
    assert admin(f"users/{quote(wire.guest_broker_user(instance_id), safe='')}")[0] == 404
    assert f"guestagent.{instance_id}" not in queue_depths(running)
