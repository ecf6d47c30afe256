"""The local compute driver with real processes: placeholder guests passed explicitly, so
these run without a broker and whatever the guest agent does."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.services import ROOT, wait_until
from tests.support.stack import SLEEP, configure, processes_of
from workers.guestagent.api import GuestConfig
from workers.taskmanager.compute import SpawnError, get_driver
from workers.taskmanager.compute.local import (DATASTORE_PORTS, LocalDriver, config_path,
                                               instance_dir, instances_root)

# A guest that starts a child in its process group and one in a session of its own (as
# pg_ctl does with the postmaster); every process carries the instance id in its argv.
FAMILY = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {SLEEP!r}, sys.argv[-1]])
subprocess.Popen([sys.executable, "-c", {SLEEP!r}, sys.argv[-1]], start_new_session=True)
time.sleep(600)
"""
STUBBORN = f"import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); {SLEEP}"
# A guest that ignores SIGTERM and leaves behind, detached and working in the instance's
# directory, a child that ignores it too (a postmaster that will not stop).
STUBBORN_FAMILY = f"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", {STUBBORN!r}, "leftover"], start_new_session=True)
time.sleep(600)
"""


def placeholder(script: str = SLEEP) -> list[str]:
    return [sys.executable, "-c", script]


@pytest.fixture
def var_dir(monkeypatch, tmp_path) -> Path:
    configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_SERVICE_KEY="not-for-guests")
    return tmp_path / "var"


@pytest.fixture
def instance(var_dir):
    """A new instance's id (nothing of it on disk yet); whatever the test leaves running is
    destroyed afterwards."""
    instance_id = str(uuid.uuid4())
    yield instance_id
    LocalDriver(placeholder(), stop_timeout=1).destroy(instance_id)


def guest_config(instance_id: str, **fields) -> GuestConfig:
    """A config as the taskmanager hands it to the driver: everything but its data_dir."""
    return GuestConfig(instance_id=instance_id, secret="s" * 64, broker_url="memory://",
                       generation=3, **fields)


def spawn(driver: LocalDriver, instance_id: str) -> None:
    driver.spawn(instance_id, guest_config(instance_id))


def test_spawn_is_idempotent_and_destroy_leaves_nothing(instance):
    driver = LocalDriver(placeholder(FAMILY), startup_grace=0.5, stop_timeout=5)
    spawn(driver, instance)
    assert driver.is_running(instance)
    wait_until(lambda: len(processes_of(instance)) == 3, timeout=10, message="the guest and its children")
    pid_file = Path(instance_dir(instance)) / "guest.pid"
    recorded = pid_file.read_text()

    spawn(driver, instance)  # a redelivered create
    assert pid_file.read_text() == recorded
    assert len(processes_of(instance)) == 3

    driver.destroy(instance)
    assert processes_of(instance) == []
    assert not Path(instance_dir(instance)).exists()
    assert not driver.is_running(instance)
    driver.destroy(instance)  # a redelivered delete


def test_concurrent_deliveries_start_one_guest(instance):
    driver = LocalDriver(placeholder(), startup_grace=0.2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda _: spawn(driver, instance), range(4)))
    assert len(processes_of(instance)) == 1


def test_guest_sees_none_of_the_control_planes_environment(instance):
    driver = LocalDriver(placeholder(), startup_grace=0.2)
    spawn(driver, instance)
    [pid] = processes_of(instance)
    environ = dict(entry.split(b"=", 1) for entry in
                   Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if entry)
    assert not [name for name in environ if name.startswith(b"DBAAS_")]
    assert os.readlink(f"/proc/{pid}/cwd") == instance_dir(instance)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.getsid(pid) == pid  # detached: outlives the worker that started it


def test_a_guest_ignoring_sigterm_is_killed(instance):
    driver = LocalDriver(placeholder(STUBBORN), startup_grace=0.5, stop_timeout=0.5)
    spawn(driver, instance)
    started = time.monotonic()
    driver.destroy(instance)
    assert processes_of(instance) == []
    assert time.monotonic() - started < 10


def test_detached_leftovers_in_the_instance_directory_are_killed(instance):
    """What the guest left in a session of its own, working in the instance's directory,
    is the instance's: SIGTERM, then SIGKILL when it ignores that."""
    driver = LocalDriver(placeholder(STUBBORN_FAMILY), startup_grace=0.5, stop_timeout=0.5)
    spawn(driver, instance)
    leftover = wait_until(lambda: [pid for pid in processes_of("leftover")
                                   if os.readlink(f"/proc/{pid}/cwd") == instance_dir(instance)],
                          timeout=10, message="the detached leftover")
    assert os.getsid(leftover[0]) == leftover[0]  # not in the guest's process group
    started = time.monotonic()
    driver.destroy(instance)
    assert processes_of(instance) == []
    assert [pid for pid in leftover if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in "ZX"] == []
    assert not Path(instance_dir(instance)).exists()
    assert time.monotonic() - started < 10


def test_a_guest_that_dies_at_once_is_a_spawn_error(instance):
    driver = LocalDriver(placeholder("import sys; print('no such datastore'); sys.exit(3)"))
    with pytest.raises(SpawnError, match="exited at once with status 3: no such datastore"):
        spawn(driver, instance)
    assert not driver.is_running(instance)


def test_spawn_delivers_the_config_owner_only_with_the_data_dir_it_chose(instance):
    spawn(LocalDriver(placeholder(), startup_grace=0.2), instance)
    path = Path(config_path(instance))
    assert path == Path(instances_root()) / instance / "guest.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the guest's secret
    assert json.loads(path.read_text()) == {
        "instance_id": instance, "secret": "s" * 64, "broker_url": "memory://", "generation": 3,
        "conductor_queue": "trove-conductor", "datastore": "sqlite",
        "data_dir": os.path.join(instance_dir(instance), "data"), "backup_root": "",
        "heartbeat_interval": 10.0}
    [pid] = processes_of(instance)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-3:-1] == [b"--config", bytes(path)]


def test_destroy_of_an_instance_never_spawned_does_nothing(instance):
    LocalDriver(placeholder()).destroy(instance)
    assert not Path(instance_dir(instance)).exists()


def test_a_reused_pid_is_not_the_guest(instance):
    """A pid file naming a process that is not the guest (same pid, other start time)."""
    stranger = subprocess.Popen(placeholder(), start_new_session=True)
    try:
        os.makedirs(instance_dir(instance))
        pid_file = Path(instance_dir(instance)) / "guest.pid"
        pid_file.write_text(f"{stranger.pid} 1")
        driver = LocalDriver(placeholder(), stop_timeout=1)
        assert not driver.is_running(instance)
        driver.destroy(instance)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(timeout=10)


def zombies_of(parent: int) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(name))
    return found


def test_a_guest_that_exits_is_reaped(instance):
    """The guest is a child of the process that spawned it (a taskmanager worker): once it
    ends it must not stay behind as a zombie."""
    driver = LocalDriver(placeholder(), startup_grace=0.2)
    spawn(driver, instance)
    [pid] = processes_of(instance)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10, message="the guest reaped")
    assert zombies_of(os.getpid()) == []
    assert not driver.is_running(instance)


def test_an_agent_started_by_hand_is_found_through_its_data(instance, tmp_path):
    """An agent records itself in the instance's data (workers/guestagent/pidlock.py): one
    started by hand — another session, another working directory, no pid file of the
    driver's — counts as the instance's guest, and destroy stops it."""
    data_dir = os.path.join(instance_dir(instance), "data")
    by_hand = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom workers.guestagent import pidlock\n"
                               "pidlock.hold(sys.argv[1])\ntime.sleep(600)", data_dir],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        driver = LocalDriver(placeholder(), startup_grace=0.2, stop_timeout=2)
        wait_until(lambda: driver.is_running(instance), timeout=10, message="the agent recorded")
        assert driver.holds(instance) is False  # no config: nothing to start again
        spawn(driver, instance)
        assert processes_of(instance) == [by_hand.pid]
        driver.destroy(instance)
        assert by_hand.wait(timeout=10) == -signal.SIGTERM
        assert not Path(instance_dir(instance)).exists()
    finally:
        by_hand.kill()
        by_hand.wait()


def test_endpoint_is_chosen_once_and_never_shared(instance):
    # Before spawn, as the taskmanager asks for it: nothing of the instance exists yet.
    driver = LocalDriver(placeholder(), startup_grace=0.2)
    host, port = driver.allocate_endpoint(instance)
    assert (host, port) == driver.allocate_endpoint(instance)
    assert port in DATASTORE_PORTS
    with socket.socket() as listener:
        listener.bind((host, port))  # free when chosen
    spawn(driver, instance)
    assert driver.allocate_endpoint(instance) == (host, port)  # a redelivered create
    others = [str(uuid.uuid4()) for _ in range(50)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        ports = list(pool.map(lambda other: driver.allocate_endpoint(other)[1], others))
    assert len(set(ports + [port])) == 51


@pytest.mark.parametrize("bad", ["../../etc", "x", str(uuid.uuid4()).upper()])
def test_only_canonical_instance_ids_become_paths(var_dir, bad):
    with pytest.raises(ValueError):
        LocalDriver(placeholder()).destroy(bad)


def test_drivers_are_chosen_by_name(var_dir, monkeypatch):
    assert isinstance(get_driver(), LocalDriver)
    configure(monkeypatch, DBAAS_COMPUTE_DRIVER="local")
    assert isinstance(get_driver(), LocalDriver)
    with pytest.raises(ValueError, match="unknown compute driver 'nova'"):
        get_driver("nova")
    configure(monkeypatch, DBAAS_COMPUTE_DRIVER="nova")
    with pytest.raises(ValueError, match="unknown compute driver 'nova'; choose one of local"):
        get_driver()


def test_guest_command_setting(var_dir, monkeypatch):
    configure(monkeypatch, DBAAS_GUEST_COMMAND="/opt/guest/bin/python -m workers.guestagent run")
    assert LocalDriver().command == ["/opt/guest/bin/python", "-m", "workers.guestagent", "run"]
    assert LocalDriver(["/bin/guest"]).command == ["/bin/guest"]  # explicit wins
    configure(monkeypatch, DBAAS_GUEST_COMMAND="")
    assert LocalDriver().command == [sys.executable, "-m", "workers.guestagent", "run"]
