"""dbaas.broker.rabbitmq: py-amqp reading a buffer at a time. Frames cut anywhere by the
socket come out whole and in order; a frame not all there yet waits without losing what
arrived; against a real RabbitMQ every message comes through, bodies larger than the
read-ahead and than a frame included."""

import socket
import struct

import pytest
from amqp.exceptions import UnexpectedFrame
from kombu import Connection, Exchange, Queue
from kombu.asynchronous import Hub

from dbaas.broker import rabbitmq
from dbaas.broker.rabbitmq import ReadAheadTCPTransport, transport_for


def frame(frame_type: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


@pytest.fixture
def pair():
    ours, peer = socket.socketpair()
    ours.settimeout(0)  # as the worker's event loop reads: never waiting
    transport = ReadAheadTCPTransport.__new__(ReadAheadTCPTransport)
    transport.sock, transport.connected = ours, True
    transport._setup_transport()
    yield transport, peer
    ours.close()
    peer.close()


def test_frames_cut_anywhere_come_out_whole_and_in_order(pair):
    transport, peer = pair
    frames = [(1, 1, b"method"), (2, 1, b"header" * 50), (3, 1, bytes(range(256)) * 40), (8, 0, b"")]
    wire = b"".join(frame(*f) for f in frames)
    received = []
    timeouts = 0
    for start in range(0, len(wire), 7):  # 7 bytes at a time: headers split too
        peer.sendall(wire[start:start + 7])
        while True:
            try:
                with transport.having_timeout(0):
                    received.append(transport.read_frame())
            except socket.timeout:  # the rest is not there yet: what came is kept
                timeouts += 1
                break
    assert timeouts > len(frames)
    assert received == frames


def test_many_frames_in_one_read_cost_one_system_call(pair, monkeypatch):
    transport, peer = pair
    peer.sendall(b"".join(frame(3, 1, b"x" * 100) for _ in range(100)))
    calls = []
    recv = transport.sock.recv
    monkeypatch.setattr(transport, "sock", type("Counting", (), {
        "recv": lambda self, n, flags=0: calls.append(n) or recv(n, flags),
        "gettimeout": lambda self: 0.0, "settimeout": lambda self, t: None})())
    assert [transport.read_frame() for _ in range(100)] == [(3, 1, b"x" * 100)] * 100
    assert calls == [rabbitmq.READ_AHEAD]


def test_reading_now_never_waits_nor_switches_a_blocking_socket(pair):
    transport, peer = pair
    transport.sock.settimeout(None)  # blocking, as py-amqp leaves it between reads
    whole = frame(3, 1, b"y" * 300)
    peer.sendall(whole[:100])
    with pytest.raises(socket.timeout):
        transport.read_frame_now()
    assert transport.sock.gettimeout() is None
    peer.sendall(whole[100:] + whole)
    assert transport.read_frame_now() == transport.read_frame_now() == (3, 1, b"y" * 300)
    with pytest.raises(socket.timeout):
        transport.read_frame_now()


def test_the_loop_reader_asks_for_another_turn_only_while_frames_are_buffered(pair):
    transport, peer = pair
    count = 3 * rabbitmq.MESSAGES_PER_TURN + 5
    peer.sendall(b"".join(frame(3, 1, b"z" * 40) for _ in range(count)))  # all in one read

    class Loop:
        turns = []

        def call_soon(self, callback, *args):
            self.turns.append((callback, args))

    class AmqpConnection:
        connected = True
        frames = []

        def __init__(self):
            self.transport = transport

        def drain_events(self, timeout):
            assert timeout == 0
            self.frames.append(transport.read_frame_now())

    connection, loop = AmqpConnection(), Loop()
    read = rabbitmq.Transport.__new__(rabbitmq.Transport)._make_reader(connection)
    read(loop)  # woken by the socket: one turn's worth, and another turn asked for
    assert len(connection.frames) == rabbitmq.MESSAGES_PER_TURN and len(loop.turns) == 1
    while loop.turns:
        callback, args = loop.turns.pop()
        callback(*args)
    assert len(connection.frames) == count  # the last turn emptied the buffer and asked for none
    read(loop)  # woken with nothing there: nothing read, no turn asked for
    assert len(connection.frames) == count and not loop.turns


def test_a_bad_frame_end_or_a_closed_peer_ends_the_connection(pair):
    transport, peer = pair
    peer.sendall(frame(1, 1, b"m", end=0x00))
    with pytest.raises(UnexpectedFrame):
        transport.read_frame()
    assert not transport.connected

    transport.connected = True
    transport._setup_transport()
    peer.close()
    with pytest.raises(OSError, match="closed"):
        transport.read_frame()
    assert not transport.connected


def test_chosen_for_plain_amqp_urls_only():
    ours = "dbaas.broker.rabbitmq:Transport"
    assert transport_for("amqp://guest:guest@127.0.0.1:5672//") == ours
    assert transport_for("pyamqp://a//;amqp://b//") == ours
    assert transport_for("amqps://a//") is None  # TLS: py-amqp's own
    assert transport_for("amqp://a//;amqps://b//") is None
    assert transport_for("dbaasfs:///var/broker") is None


def test_every_message_through_a_real_rabbitmq(rabbit):
    queue = Queue("read-ahead", Exchange("read-ahead"), "read-ahead")
    # Sizes around the read-ahead and a frame (131072 bytes by default), and many small ones.
    sizes = [1, 500, rabbitmq.READ_AHEAD - 1, rabbitmq.READ_AHEAD + 1, 300_000] + [200] * 2000
    received = []
    with Connection(rabbit.url, transport=rabbitmq.Transport) as conn:
        assert isinstance(conn.connection.transport, ReadAheadTCPTransport)
        producer = conn.Producer()
        for number, size in enumerate(sizes):
            producer.publish(bytes([number % 251]) * size, exchange=queue.exchange, routing_key="read-ahead",
                             declare=[queue], headers={"n": number}, content_type="application/data",
                             content_encoding="binary")
        with conn.Consumer([queue], callbacks=[lambda body, message: (received.append(
                (message.headers["n"], body)), message.ack())], accept=["application/data"]):
            while len(received) < len(sizes):
                conn.drain_events(timeout=10)
    assert [n for n, _ in received] == list(range(len(sizes)))
    assert [body for _, body in received] == [bytes([n % 251]) * size for n, size in enumerate(sizes)]


def test_every_message_through_the_event_loop(rabbit):
    """As the worker reads: kombu's event loop, the reader called when the socket is
    readable, and again only while whole frames are left in the buffer."""
    queue = Queue("read-ahead-loop", Exchange("read-ahead-loop"), "read-ahead-loop")
    sizes = [300_000, rabbitmq.READ_AHEAD + 1] + [200] * 3000
    received = []
    with Connection(rabbit.url, transport=rabbitmq.Transport) as publisher:
        producer = publisher.Producer()
        for number, size in enumerate(sizes):
            producer.publish(bytes([number % 251]) * size, exchange=queue.exchange, routing_key=queue.name,
                             declare=[queue], headers={"n": number}, content_type="application/data",
                             content_encoding="binary")
    hub = Hub()
    with Connection(rabbit.url, transport=rabbitmq.Transport) as conn:
        conn.transport.register_with_event_loop(conn.connection, hub)
        with conn.Consumer([queue], callbacks=[lambda body, message: (received.append(
                (message.headers["n"], body)), message.ack())], accept=["application/data"]):
            loop = hub.create_loop()
            for _ in range(100_000):
                if len(received) == len(sizes):
                    break
                next(loop)
        hub.close()
    assert [n for n, _ in received] == list(range(len(sizes)))
    assert [body for _, body in received] == [bytes([n % 251]) * size for n, size in enumerate(sizes)]
