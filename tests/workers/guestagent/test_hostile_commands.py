"""A running guest agent against hostile commands on its own command queue
(``guestagent.<instance id>``, exchange ``guestagent``), from whoever can publish there: on
RabbitMQ only the control plane should (a guest's broker user may publish to the
conductor's exchange alone), on the embedded broker any local process can.

Malformed bodies, deep JSON and deep header tables, other content types and encodings,
unsigned commands, commands signed with another instance's secret or meant for another
instance, and frames or files no kombu client writes. Each is refused with a log line;
afterwards the agent is alive, has carried out nothing (no "command …" line but for the
valid ones, its instance still running, no backup made), and a valid command still works.
"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from dbaas import db, signing, wire
from dbaas.models import Instance
from dbaas.queues import queue
from tests.support.hostile import (GUESTS_QUEUE, GUEST_EXCHANGE, Broker, Case, Process, Runner,
                                   amqp_table, basic_properties, deep_table_value, module_stack,
                                   record_failures, stop_quickly, virtual_payload)
from tests.support.services import ROOT, project_env, wait_until
from tests.support.stack import make_instances
from workers.guestagent import config as guest_config
from workers.guestagent.commands import command_queue, send_command

BOTH = ("rabbitmq-postgresql", "embedded")
RABBIT, EMBEDDED = ("rabbitmq-postgresql",), ("embedded",)
ZEROS = "0" * 64
# What the agent logs for a command it does not carry out: refused (CommandRefused), failed
# (any other exception: logged with a traceback), or not decodable (kombu's ConsumerMixin).
GUEST_REFUSAL = re.compile(r"(?:refused a command: |ERROR guestagent: (?=command failed)|"
                           r"(?=Can't decode message body))(?P<reason>.*)$", re.M)
CARRIED_OUT = re.compile(r"INFO guestagent: command (?P<command>\w+) (?!done)", re.M)


class Agent:
    """``python -m workers.guestagent run`` as the compute driver starts it."""

    def __init__(self, config_path: Path, log_path: Path):
        self.config_path, self.log_path = config_path, log_path
        self.process = None

    def start(self) -> "Agent":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.guestagent", "run", "--config", str(self.config_path)],
                cwd=ROOT, env=project_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: "Connected to" in self.log() or self.process.poll() is not None, timeout=30,
                   message="the agent consuming its queue")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


class System:
    def __init__(self, stack, guest_dir: Path):
        self.stack = stack
        secrets = make_instances(2, datastore="sqlite")
        (g, sg), (h, sh) = secrets.items()
        self.g, self.secret, self.h, self.other_secret = g, sg, h, sh
        self.guest_dir = guest_dir
        self.broker = Broker(stack)
        self.broker.declare(queue(GUESTS_QUEUE), command_queue(g), command_queue(h))
        self.broker.start_firehose()
        self.conductor = stack.worker("conductor").start()
        self.config = guest_config.GuestConfig(
            instance_id=g, secret=sg, generation=1, broker_url=stack.broker_url, datastore="sqlite",
            data_dir=str(guest_dir / g), backup_root=str(guest_dir / "backups"), heartbeat_interval=0.5)
        config_path = guest_dir / f"{g}.json"
        guest_config.write(str(config_path), self.config)
        self.valid_commands = 0  # carried out by the agent now running
        self.hostile_carried_out = 0  # hostile commands it carried out (each reported with its case)

        def start_agent():
            self.valid_commands = self.hostile_carried_out = 0
            return Agent(config_path, guest_dir / f"{g}-{uuid.uuid4().hex[:6]}.log").start()
        self.process = Process(start=start_agent, queues=(f"guestagent.{g}",))
        self.runner = Runner(stack, self.broker, self.process, valid=self.valid_command,
                             refusal=GUEST_REFUSAL, checks=self.nothing_done,
                             others_may_publish_to=("celeryev", GUESTS_QUEUE))
        self.runner.ensure_running()
        self.command("prepare")
        wait_until(lambda: self.status() == "running", timeout=60, message="the guest's datastore running")

    def command(self, name: str, **args) -> None:
        send_command(self.stack.broker_url, self.g, self.secret, name, args)
        self.valid_commands += 1

    def status(self):
        with db.session_scope() as session:
            return session.get(Instance, self.g).service_status

    def valid_command(self):
        """A valid restart: the agent takes it and carries it out (on a guest not prepared
        yet, its handler then says there is nothing to restart)."""
        def restarts():
            return sum(1 for m in CARRIED_OUT.finditer(self.process.log()) if m["command"] == "restart")
        before = restarts()
        self.command("restart")
        return lambda: restarts() > before

    def nothing_done(self) -> list[str]:
        problems = []
        carried_out = [m["command"] for m in CARRIED_OUT.finditer(self.process.log())]
        if len(carried_out) != self.valid_commands + self.hostile_carried_out:
            problems.append(f"the agent carried out {carried_out}; {self.valid_commands} valid command(s) were "
                            f"sent to it")
        if self.status() != "running":
            problems.append(f"the instance's status is {self.status()!r}, not 'running'")
        backups = self.guest_dir / "backups"
        if backups.exists() and any(backups.iterdir()):
            problems.append(f"backups were made: {sorted(p.name for p in backups.iterdir())}")
        if self.conductor.process.poll() is not None:
            problems.append("the conductor died")
        return problems

    # --- the attacker

    def publish(self, body, headers=None, content_type="application/json", content_encoding="utf-8", **props):
        self.broker.publish(GUEST_EXCHANGE, self.g, body, headers=headers or {}, content_type=content_type,
                            content_encoding=content_encoding, **props)

    def signed(self, command: str, args: dict, secret: str | None = None, principal=signing.SERVICE_PRINCIPAL):
        """(body, headers) of a command signed as the control plane signs one."""
        header = signing.auth_header(principal, secret or self.secret, f"guest.{command}", [], args)
        return json.dumps({"command": command, "args": args}).encode(), {wire.AUTH_HEADER: header}

    def carried_out(self) -> int:
        return len(CARRIED_OUT.findall(self.process.log()))

    def hostile(self, name, send, **options) -> Case:
        """A case: refused, and nothing carried out (checked against the count before it)."""
        before = {}

        def sending():
            before["count"] = self.carried_out()
            send()

        def taken():
            return "count" in before and self.carried_out() > before["count"]

        def after():
            done = [m["command"] for m in CARRIED_OUT.finditer(self.process.log())][before["count"]:]
            if done:
                self.hostile_carried_out += len(done)
                return f"CARRIED OUT: {done}"
        return Case(name, sending, after=after, taken=taken, **options)

    def case(self, name, body, headers=None, unpublishable=(), only=BOTH, **props):
        return self.hostile(name, lambda: self.publish(body, headers, **props), unpublishable=unpublishable,
                            only=only)

    def sent(self, name, send):
        return self.hostile(name, send)

    def raw(self, name, body, properties):
        return self.hostile(name, lambda: self.broker.publish_raw_amqp(GUEST_EXCHANGE, self.g, body, properties),
                            only=RABBIT)

    def file(self, name, payload: bytes):
        return self.hostile(name, lambda: self.broker.write_message_file(f"guestagent.{self.g}", payload),
                            expect="handled", only=EMBEDDED)

    def close(self):
        if self.process.current is not None:
            self.process.current.stop()
        stop_quickly(self.conductor)
        self.broker.close()


@pytest.fixture(scope="module", params=["rabbitmq-postgresql", "embedded"])
def system(request, tmp_path_factory):
    guest_dir = Path(tempfile.mkdtemp(prefix="dbaas-hostile-guest-"))
    try:
        with module_stack(request.param, tmp_path_factory.mktemp(request.param)) as stack:
            built = System(stack, guest_dir)
            try:
                yield built
            finally:
                built.close()
    finally:
        shutil.rmtree(guest_dir, ignore_errors=True)


def check(failures):
    record_failures(failures)
    if failures:
        pytest.fail(f"{len(failures)} failure(s):\n" + "\n".join(failures), pytrace=False)


def test_malformed_and_deep(system):
    s = system
    stop_body, stop_headers = s.signed("stop", {})
    nested = "[" * 5_000 + "]" * 5_000
    cases = [
        *[s.case(name, body, stop_headers) for name, body in [
            ("empty body", b""), ("not JSON", b"{not json"), ("a list", b'["stop", {}]'), ("null", b"null"),
            ("no args", b'{"command": "stop"}'), ("an extra key", b'{"command": "stop", "args": {}, "x": 1}'),
            ("command a list", b'{"command": ["stop"], "args": {}}'), ("args a list", b'{"command": "stop", "args": []}'),
            ("an unknown command", b'{"command": "shell", "args": {"cmd": "touch /tmp/pwned"}}'),
            ("NaN", b'{"command": "stop", "args": {"x": NaN}}'),
            ("65 KiB", json.dumps({"command": "stop", "args": {"pad": "x" * 66_000}}).encode()),
            ("args nested 5,000", f'{{"command": "stop", "args": {{"x": {nested}}}}}'.encode()),
            ("the body nested 5,000", nested.encode()),
            ("two documents", stop_body + stop_body)]],
        s.sent("args nested 13 (validly signed)", lambda: s.publish(*s.signed("prepare", {
            "restore_location": [[[[[[[[[[[[["x"]]]]]]]]]]]]]}))),
    ]
    headers = s.signed("stop", {})[1]
    table = [(wire.AUTH_HEADER, headers[wire.AUTH_HEADER])]
    cases += [
        s.raw("AMQP header table nested 3,000", stop_body,
              basic_properties(headers=amqp_table(table + [("x-deep", deep_table_value(3_000))]))),
        s.raw("AMQP 'dbaas_auth' nested 3,000", stop_body,
              basic_properties(headers=amqp_table([(wire.AUTH_HEADER, deep_table_value(3_000))]))),
        s.file("file: headers nested 100,000", json.dumps(virtual_payload(stop_body, headers, f"guestagent.{s.g}")).replace(
            '"headers": {', '"headers": {"x-deep": ' + "[" * 100_000 + "]" * 100_000 + ", ", 1).encode()),
    ]
    check(s.runner.run("malformed and deep", cases, lock_database=False, expect_unchanged=False))


def test_content_types_and_encodings(system):
    s = system
    # Validly signed (a restart): if the encoding is not refused, the agent carries it out.
    body, headers = s.signed("restart", {})
    bogus = {wire.AUTH_HEADER: {**headers[wire.AUTH_HEADER], "mac": ZEROS}}
    marker = f"/tmp/redteam-guest-pwned-{uuid.uuid4().hex}"

    class Exploit:
        def __reduce__(self):
            return (open, (marker, "w"))
    cases = [
        s.case("pickle (with a payload that writes a file)", pickle.dumps({"command": "restart", "args": {}, "x": Exploit()}),
               headers, content_type="application/x-python-serialize", content_encoding="binary"),
        s.case("YAML with a python object tag", f"!!python/object/apply:os.system ['touch {marker}']".encode(),
               headers, content_type="application/x-yaml"),
        s.case("text/plain", body, headers, content_type="text/plain"),
        s.case("content encoding 'binary'", body, headers, content_encoding="binary"),
        s.case("UTF-16 body claiming utf-8", body.decode().encode("utf-16"), headers),
        s.case("compression header, body not compressed", body, {**headers, "compression": "application/x-gzip"}),
        s.case("invalid UTF-8", b'{"command": "restart", "args": {"x": "\xff"}}', headers),
        s.raw("content type not UTF-8", body, basic_properties(content_type=b"application/json\xff",
                                                               headers=amqp_table(list(bogus.items())))),
        s.raw("header name not UTF-8", body, basic_properties(headers=amqp_table(
            list(bogus.items()) + [(b"\xff", 1)]))),
    ]
    payload = virtual_payload(body, bogus, f"guestagent.{s.g}")
    cases += [
        s.file("file: not JSON", b"{not json"),
        s.file("file: delivery tag a list", json.dumps({**payload, "properties": {
            **payload["properties"], "delivery_tag": ["x"]}}).encode()),
        s.file("file: body not base64", json.dumps({**payload, "body": "%%%"}).encode()),
        s.file("file: headers a list", json.dumps({**payload, "headers": [1]}).encode()),
    ]
    check(s.runner.run("content types and encodings", cases, lock_database=False, expect_unchanged=False))
    assert not os.path.exists(marker), "a hostile payload ran in the guest agent"


def test_who_may_command(system):
    s, g = system, system.g
    body, headers = s.signed("stop", {})
    mac = headers[wire.AUTH_HEADER]["mac"]
    cases = [
        s.case("unsigned (no headers)", body, {}),
        s.case("dbaas_auth a string", body, {wire.AUTH_HEADER: "service"}),
        s.case("dbaas_auth null", body, {wire.AUTH_HEADER: None}),
        s.case("MAC of zeros", body, {wire.AUTH_HEADER: {**headers[wire.AUTH_HEADER], "mac": ZEROS}}),
        s.case("MAC in capitals", body, {wire.AUTH_HEADER: {**headers[wire.AUTH_HEADER], "mac": mac.upper()}}),
        s.case("MAC of 64 non-ASCII characters", body, {wire.AUTH_HEADER: {**headers[wire.AUTH_HEADER],
                                                                           "mac": "\u00e9" * 64}}),
        s.sent("signed with another instance's secret", lambda: s.publish(*s.signed("stop", {}, s.other_secret))),
        s.sent("signed with the service key", lambda: s.publish(*s.signed("stop", {}, "test-service-key"))),
        s.sent("signed as the instance itself (an instance principal)", lambda: s.publish(
            *s.signed("stop", {}, principal=signing.instance_principal(g)))),
        s.sent("another instance's valid command, delivered to this one", lambda: s.publish(
            *s.signed("backup", {"backup_id": str(uuid.uuid4())}, s.other_secret))),
        s.sent("a valid 'restart' MAC on a 'stop' body", lambda: s.publish(
            body, s.signed("restart", {})[1])),
        s.sent("a valid 'backup' MAC with other args", lambda: s.publish(
            json.dumps({"command": "backup", "args": {"backup_id": "other"}}).encode(),
            s.signed("backup", {"backup_id": "mine"})[1])),
    ]
    check(s.runner.run("who may command", cases, lock_database=False, expect_unchanged=False))
