"""The taskmanager SIGKILLed in the middle of provisioning and in the middle of a delete,
then started again: every instance ends ACTIVE or deleted — never stuck — with exactly one
guest agent while it lives and no guest process, data directory, broker user or command
queue once it is gone. Real guest agents (SQLite datastore), a private RabbitMQ node with
quorum queues, private PostgreSQL."""

import re
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from dbaas import wire
from tests.support.faults import guest_logs, guest_pid, instances_by_id
from tests.support.services import wait_until
from tests.support.stack import processes_of
from workers.guestagent.pidlock import running_agent
from workers.taskmanager.compute.local import instance_dir

pytestmark = pytest.mark.fault

FAST_GUESTS = {"DBAAS_GUEST_HEARTBEAT_INTERVAL": "1"}


def exists(vhost, path: str) -> bool:
    response = requests.get(f"http://127.0.0.1:{vhost.nodes[0].management_port}/api/{path}",
                            auth=("guest", "guest"), timeout=30)
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


def only_its_guest(instance_id: str) -> bool:
    """Exactly one process names the instance, and it is the agent its data records."""
    return processes_of(instance_id) == [running_agent(str(Path(instance_dir(instance_id)) / "data"))]


def test_taskmanager_sigkilled_mid_provisioning(vhost, database_url, make_system):
    system = make_system(vhost.url, database_url, vhost.admin_url(), **FAST_GUESTS)
    conductor, taskmanager = system.conductor(), system.taskmanager()
    system.start(conductor, taskmanager)
    ids = [system.create_instance(f"db{n}") for n in range(3)]
    # A guest is started and the taskmanager waits out its start-up grace before it sends
    # `prepare`: the kill lands between the two.
    started = wait_until(lambda: [i for i in ids if processes_of(i)], timeout=60, interval=0.01,
                         message="a guest started")
    taskmanager.kill()
    killed_at = time.monotonic()
    at_kill = {i: bool(processes_of(i)) for i in ids}
    # A guest started a moment before the kill may not be in the taskmanager's pid file yet.
    unrecorded = sum(1 for i in ids if at_kill[i] and guest_pid(i) is None)
    statuses = {i: system.api.instance_show(i)["status"] for i in ids}
    assert "ACTIVE" not in statuses.values(), f"provisioning was over before the kill: {statuses}"
    restarted = system.taskmanager("taskmanager-again")
    system.start(restarted)
    system.wait_active(ids, timeout=120)
    recovered = time.monotonic() - killed_at
    for instance_id in ids:
        assert only_its_guest(instance_id), (instance_id, processes_of(instance_id), restarted.log()[-4000:],
                                             guest_logs())
    redelivered = restarted.log().count("taskmanager.create_instance") // 2
    print(f"\ntaskmanager SIGKILL mid-provisioning: {len(ids)} instances, guests running at the kill "
          f"{sum(at_kill.values())} (started first: {len(started)}, not yet in the pid file: {unrecorded}), creates redelivered {redelivered}, "
          f"ACTIVE {len(ids)} of {len(ids)} {recovered:.1f}s after the kill, duplicate guests 0, stuck 0")


def test_taskmanager_sigkilled_mid_delete(vhost, database_url, make_system):
    system = make_system(vhost.url, database_url, vhost.admin_url(), **FAST_GUESTS)
    conductor, taskmanager = system.conductor(), system.taskmanager()
    system.start(conductor, taskmanager)
    ids = [system.create_instance(f"db{n}") for n in range(3)]
    system.wait_active(ids)
    directories = {i: Path(instance_dir(i)) for i in ids}
    for instance_id in ids:
        system.api.instance_delete(instance_id)
    # destroy() sends the guest SIGTERM and waits for it to stop: the kill lands there.
    wait_until(lambda: "signal SIGTERM" in guest_logs(), timeout=60, interval=0.01,
               message="a guest told to stop")
    taskmanager.kill()
    killed_at = time.monotonic()
    at_kill = {i: (bool(processes_of(i)), directories[i].exists()) for i in ids}
    assert any(alive or kept for alive, kept in at_kill.values()), "the deletes were over before the kill"
    restarted = system.taskmanager("taskmanager-again")
    system.start(restarted)
    try:
        wait_until(lambda: all(r.deleted for r in instances_by_id(ids).values()), timeout=120,
                   interval=0.3, message="every instance deleted")
    except AssertionError:
        raise AssertionError(f"{system.logs()}\n{guest_logs()}") from None
    gone = time.monotonic() - killed_at
    for instance_id in ids:
        assert processes_of(instance_id) == [], (instance_id, processes_of(instance_id))
        assert not directories[instance_id].exists()
        user = quote(wire.guest_broker_user(instance_id), safe="")
        assert not exists(vhost, f"users/{user}")
        assert not exists(vhost, f"queues/{quote(vhost.name, safe='')}/guestagent.{instance_id}")
    print(f"\ntaskmanager SIGKILL mid-delete: {len(ids)} instances, at the kill guests alive "
          f"{sum(a for a, _ in at_kill.values())} and data dirs left {sum(k for _, k in at_kill.values())}; "
          f"deleted {len(ids)} of {len(ids)} {gone:.1f}s after the kill; orphaned processes 0, "
          f"data dirs 0, broker users 0, command queues 0")


def test_instance_deleted_while_the_taskmanager_is_down_mid_provisioning(vhost, database_url, make_system):
    """The operator's answer to an instance stuck in BUILD because the taskmanager died:
    delete it. The taskmanager is SIGKILLed as soon as it took the create, before the guest
    started; back, it holds the interrupted create (redelivered) and the delete, and its two
    pool processes run them side by side. The instance ends deleted, with no guest, data
    directory, broker user or command queue left behind."""
    system = make_system(vhost.url, database_url, vhost.admin_url(), **FAST_GUESTS)
    conductor, taskmanager = system.conductor(), system.taskmanager()
    system.start(conductor, taskmanager)
    instance_id = system.create_instance("db")
    wait_until(lambda: "taskmanager.create_instance[" in taskmanager.log(), timeout=60, interval=0.005,
               message="the create taken")
    taskmanager.kill()
    killed_at = time.monotonic()
    guest_at_kill = bool(processes_of(instance_id))
    system.api.instance_delete(instance_id)
    restarted = system.taskmanager("taskmanager-again")
    system.start(restarted)
    try:
        wait_until(lambda: instances_by_id([instance_id])[instance_id].deleted, timeout=120,
                   interval=0.3, message="the instance deleted")
    except AssertionError:
        raise AssertionError(f"{system.logs()}\n{guest_logs()}") from None
    gone = time.monotonic() - killed_at
    # Both done; the create may also fail, e.g. RabbitMQ refusing to declare a quorum queue
    # while the delete removes it (541 INTERNAL_ERROR): the instance is deleted either way.
    wait_until(lambda: len(re.findall(r"Task taskmanager\.\w+\[\S+\] (succeeded|raised)", restarted.log())) >= 2,
               timeout=60, message="the create and the delete both done")
    time.sleep(1)  # a guest started by the create would be running by now
    left = {"guest processes": processes_of(instance_id),
            "data directory": Path(instance_dir(instance_id)).exists(),
            "broker user": exists(vhost, f"users/{quote(wire.guest_broker_user(instance_id), safe='')}"),
            "command queue": exists(vhost, f"queues/{quote(vhost.name, safe='')}/guestagent.{instance_id}")}
    orphans = {what: value for what, value in left.items() if value}
    print(f"\ndelete while the taskmanager is down mid-provisioning: guest running at the kill "
          f"{guest_at_kill}, deleted {gone:.1f}s after the kill; left behind: {orphans or 'nothing'}")
    assert not orphans, f"{orphans}\n{restarted.log()[-5000:]}\n{guest_logs()}"
