"""RabbitMQ (a private node, quorum queues) restarted while guests send.

Simulated guests send exactly as the guest agent does (its Reporter over its
ConductorClient, publisher confirms, each on its instance's own broker user): a send the
broker did not confirm raises — the guest is told — and the agent drops a failed heartbeat
(the next one says the same, newer) but keeps a backup report in its outbox until the
broker confirms it. A real guest agent runs beside them. Nothing the broker confirmed is
lost; the conductor, the taskmanager and the guest agent resume by themselves.
"""

import threading
import time
import uuid

import pytest

from tests.support.faults import SimulatedGuest, Vhost, check_guests, epoch, instances_by_id
from tests.support.private_rabbit import RabbitNode
from tests.support.services import wait_until
from tests.support.stack import make_instances

pytestmark = pytest.mark.fault


@pytest.fixture
def own_node():
    node = RabbitNode(management=True)
    try:
        node.start()
        yield node
    finally:
        node.cleanup()


def test_rabbitmq_restart_while_guests_send(own_node, database_url, make_system, tmp_path):
    vhost = Vhost([own_node]).create()
    system = make_system(vhost.url, database_url, vhost.admin_url(), DBAAS_GUEST_HEARTBEAT_INTERVAL="0.5",
                         DBAAS_QUOTA_BACKUPS="100000")
    conductor, taskmanager = system.conductor(), system.taskmanager()
    system.start(conductor, taskmanager)
    real = system.create_instance("real")
    guests = [SimulatedGuest.provisioned(i, vhost.url, vhost.admin_url(), tmp_path / f"outbox-{n}", backups=600)
              for n, i in enumerate(make_instances(3))]
    system.wait_active([real])

    stop, outbox_peak = threading.Event(), [0]

    def watch_outboxes():
        while not stop.is_set():
            outbox_peak[0] = max(outbox_peak[0], sum(g.waiting() for g in guests))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch_outboxes, daemon=True)
    watcher.start()
    for guest in guests:
        guest.start(stop, pause=0.05)
    try:
        time.sleep(3)
        began = time.time()
        own_node.restart()
        back = time.time()
        time.sleep(6)
    finally:
        stop.set()
        for guest in guests:
            guest.join()
        watcher.join(10)
    for guest in guests:
        guest.flush()
        assert guest.waiting() == 0, "a backup report is still in the outbox"

    try:
        wait_until(lambda: not (r := check_guests(guests))["lost"] and not r["not_newest"], timeout=60,
                   interval=0.5, message="every confirmed message applied")
    except AssertionError:
        raise AssertionError(f"{check_guests(guests)}\n{system.logs()}") from None
    result = check_guests(guests)
    failed = [s for g in guests for s in g.failed()]
    assert failed, "no send failed: the restart did not land while guests sent"
    assert all(began - 5 <= s.began <= back + 5 for s in failed), "a send failed far from the restart"
    resumed = min(s.ended for g in guests for s in g.client.sends if s.ok and s.ended > back) - back

    # The real guest agent reconnected by itself: it beats again and does a backup.
    wait_until(lambda: epoch(instances_by_id([real])[real].last_heartbeat) > back,
               timeout=30, interval=0.3, message="the real guest beating again")
    backup_id = str(uuid.uuid4())
    system.api.backup_create(backup_id, real, "after-restart")
    wait_until(lambda: system.api.backup_show(backup_id)["state"] == "COMPLETED", timeout=60,
               interval=0.3, message="a backup after the restart")
    for worker in (conductor, taskmanager):
        assert worker.process.poll() is None, worker.log()
    for guest in guests:
        guest.close()
    print(f"\nRabbitMQ restart while guests send: sent {result['reports']} backup reports + "
          f"{result['heartbeats']} heartbeats confirmed, applied {result['applied']}, lost "
          f"{len(result['lost'])}, failed sends reported to the guests {len(failed)}, backup reports "
          f"waiting in outboxes at most {outbox_peak[0]} (0 at the end), every instance at its newest "
          f"heartbeat; broker restart {back - began:.1f}s, guests confirmed again {resumed:.1f}s after "
          f"it was back; real guest beat and backed up afterwards")
