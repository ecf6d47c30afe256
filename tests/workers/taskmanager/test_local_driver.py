"""The local compute driver with real processes: placeholder guests passed explicitly, so
these run without a broker and whatever the guest agent does."""

import os
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.stack import configure
from tests.support.services import wait_until
from tests.support.stack import SLEEP, processes_of
from workers.guestagent import config as guest_config
from workers.taskmanager import guests
from workers.taskmanager.compute import SpawnError, get_driver
from workers.taskmanager.compute.local import DATASTORE_PORTS, LocalDriver

# A guest that starts a child in its process group and one in a session of its own (as
# pg_ctl does with the postmaster); every process carries the instance id in its argv.
FAMILY = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {SLEEP!r}, sys.argv[-1]])
subprocess.Popen([sys.executable, "-c", {SLEEP!r}, sys.argv[-1]], start_new_session=True)
time.sleep(600)
"""
STUBBORN = f"import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); {SLEEP}"


def placeholder(script: str = SLEEP) -> list[str]:
    return [sys.executable, "-c", script]


@pytest.fixture
def var_dir(monkeypatch, tmp_path) -> Path:
    configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_SERVICE_KEY="not-for-guests")
    return tmp_path / "var"


@pytest.fixture
def instance(var_dir):
    """A new instance's id, its guest config written as manage.py writes it; whatever the
    test leaves running is destroyed afterwards."""
    instance_id = str(uuid.uuid4())
    guest_config.write(guests.config_path(instance_id), guest_config.GuestConfig(
        instance_id=instance_id, secret="s" * 64, broker_url="memory://",
        data_dir=os.path.join(guests.instance_dir(instance_id), "data")))
    yield instance_id
    LocalDriver(placeholder(), stop_timeout=1).destroy(instance_id)


def spawn(driver: LocalDriver, instance_id: str) -> None:
    driver.spawn(instance_id, guests.config_path(instance_id))


def test_spawn_is_idempotent_and_destroy_leaves_nothing(instance):
    driver = LocalDriver(placeholder(FAMILY), startup_grace=0.5, stop_timeout=5)
    spawn(driver, instance)
    assert driver.is_running(instance)
    wait_until(lambda: len(processes_of(instance)) == 3, timeout=10, message="the guest and its children")
    pid_file = Path(guests.instance_dir(instance)) / "guest.pid"
    recorded = pid_file.read_text()

    spawn(driver, instance)  # a redelivered create
    assert pid_file.read_text() == recorded
    assert len(processes_of(instance)) == 3

    driver.destroy(instance)
    assert processes_of(instance) == []
    assert not Path(guests.instance_dir(instance)).exists()
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
    assert os.readlink(f"/proc/{pid}/cwd") == guests.instance_dir(instance)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.getsid(pid) == pid  # detached: outlives the worker that started it


def test_a_guest_ignoring_sigterm_is_killed(instance):
    driver = LocalDriver(placeholder(STUBBORN), startup_grace=0.5, stop_timeout=0.5)
    spawn(driver, instance)
    started = time.monotonic()
    driver.destroy(instance)
    assert processes_of(instance) == []
    assert time.monotonic() - started < 10


def test_a_guest_that_dies_at_once_is_a_spawn_error(instance):
    driver = LocalDriver(placeholder("import sys; print('no such datastore'); sys.exit(3)"))
    with pytest.raises(SpawnError, match="exited at once with status 3: no such datastore"):
        spawn(driver, instance)
    assert not driver.is_running(instance)


def test_spawn_without_instance_directory_fails(var_dir):
    instance_id = str(uuid.uuid4())
    with pytest.raises(SpawnError, match="no instance directory"):
        spawn(LocalDriver(placeholder()), instance_id)
    assert not Path(guests.instance_dir(instance_id)).exists()


def test_a_reused_pid_is_not_the_guest(instance):
    """A pid file naming a process that is not the guest (same pid, other start time)."""
    stranger = subprocess.Popen(placeholder(), start_new_session=True)
    try:
        pid_file = Path(guests.instance_dir(instance)) / "guest.pid"
        pid_file.write_text(f"{stranger.pid} 1")
        driver = LocalDriver(placeholder(), stop_timeout=1)
        assert not driver.is_running(instance)
        driver.destroy(instance)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(timeout=10)


def test_endpoint_is_chosen_once_and_never_shared(instance):
    driver = LocalDriver(placeholder())
    host, port = driver.allocate_endpoint(instance)
    assert (host, port) == driver.allocate_endpoint(instance)
    assert port in DATASTORE_PORTS
    with socket.socket() as listener:
        listener.bind((host, port))  # free when chosen
    others = [str(uuid.uuid4()) for _ in range(50)]
    for other in others:
        os.makedirs(guests.instance_dir(other))
    with ThreadPoolExecutor(max_workers=8) as pool:
        ports = list(pool.map(lambda other: driver.allocate_endpoint(other)[1], others))
    assert len(set(ports + [port])) == 51


@pytest.mark.parametrize("bad", ["../../etc", "x", str(uuid.uuid4()).upper()])
def test_only_canonical_instance_ids_become_paths(var_dir, bad):
    with pytest.raises(ValueError):
        LocalDriver(placeholder()).destroy(bad)


def test_drivers_are_chosen_by_name(monkeypatch):
    assert isinstance(get_driver(), LocalDriver)
    monkeypatch.setenv("DBAAS_COMPUTE_DRIVER", "local")
    assert isinstance(get_driver(), LocalDriver)
    with pytest.raises(ValueError, match="unknown compute driver 'nova'"):
        get_driver("nova")


def test_guest_command_setting(monkeypatch):
    monkeypatch.setenv("DBAAS_GUEST_COMMAND", "/opt/guest/bin/python -m workers.guestagent run")
    assert LocalDriver().command == ["/opt/guest/bin/python", "-m", "workers.guestagent", "run"]
    monkeypatch.delenv("DBAAS_GUEST_COMMAND")
    assert LocalDriver().command == [sys.executable, "-m", "workers.guestagent", "run"]
