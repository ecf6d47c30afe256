"""RabbitMQ through py-amqp, reading ahead.

py-amqp reads each frame with three ``recv`` calls (header, payload, end octet) of exactly
the bytes it needs, and, when the worker's event loop asks for one frame without waiting,
switches the socket to non-blocking and back around each of them: about fifteen system
calls for a message of three frames. On the conductor's guests' queue that was a fifth of
its time. This transport reads up to ``READ_AHEAD`` bytes at once and hands out frames
from that buffer; a frame already in the buffer costs no system call at all.

Only plain TCP: a TLS connection (``amqps://``) keeps py-amqp's own transport. Selected
for ``amqp://`` and ``pyamqp://`` broker URLs by ``transport_for`` (celeryconfig.py).
"""

import errno
import socket
from struct import unpack_from
from urllib.parse import urlsplit

from amqp import transport as amqp_transport
from amqp.exceptions import RecoverableConnectionError, UnexpectedFrame

from kombu.transport import pyamqp

READ_AHEAD = 65536
MESSAGES_PER_TURN = 64
FRAME_END = 0xCE
PLAIN_SCHEMES = frozenset({"amqp", "pyamqp"})


class ReadAheadTCPTransport(amqp_transport.TCPTransport):
    def _setup_transport(self):
        super()._setup_transport()
        self._buffer = bytearray()
        self._start = 0  # where the next frame begins in _buffer

    def frame_buffered(self) -> bool:
        return self._buffered_frame_end() >= 0

    def _buffered_frame_end(self) -> int:
        """Index of the end octet of the next frame if all of it is buffered, else -1."""
        buffer, start = self._buffer, self._start
        if len(buffer) - start < 7:
            return -1
        end = start + 7 + unpack_from(">I", buffer, start + 3)[0]
        return end if end < len(buffer) else -1

    def read_frame(self, unpack=None):
        end = self._buffered_frame_end()
        while end < 0:
            self._fill()
            end = self._buffered_frame_end()
        buffer, start = self._buffer, self._start
        if buffer[end] != FRAME_END:
            self.connected = False
            raise UnexpectedFrame(f"Received frame_end {buffer[end]:#04x} while expecting 0xce")
        frame_type, channel = unpack_from(">BH", buffer, start)
        payload = bytes(buffer[start + 7:end])
        self._start = end + 1
        return frame_type, channel, payload

    def read_frame_now(self):
        """The next frame if the socket holds the rest of it now, else socket.timeout (with
        what arrived kept). A non-blocking read of a blocking socket (MSG_DONTWAIT): no
        switch of the socket's mode and back around it, two system calls saved per read."""
        while self._buffered_frame_end() < 0:
            self._fill(socket.MSG_DONTWAIT)
        return self.read_frame()

    def _fill(self, flags: int = 0) -> None:
        """Whatever the socket holds, up to READ_AHEAD bytes (at least one byte: a socket
        that has nothing raises socket.timeout, with the buffer kept as it was)."""
        if self._start:
            del self._buffer[:self._start]
            self._start = 0
        try:
            data = self.sock.recv(READ_AHEAD, flags)
        except socket.timeout:
            raise
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                raise socket.timeout() from None
            self.connected = False
            raise
        if not data:
            self.connected = False
            raise OSError("Server unexpectedly closed connection")
        self._buffer += data

    def _read(self, n, initial=False):
        raise NotImplementedError("frames are read by read_frame only")


class Connection(pyamqp.Connection):
    def blocking_read(self, timeout=None):
        transport = self.transport
        if timeout == 0:  # the event loop's reads: never wait
            return self.on_inbound_frame(transport.read_frame_now())
        if transport.frame_buffered():  # no socket wait: no timeout to set either
            return self.on_inbound_frame(transport.read_frame())
        return super().blocking_read(timeout)

    def Transport(self, host, connect_timeout, ssl=False, read_timeout=None,  # noqa: N802 (py-amqp's name)
                  write_timeout=None, socket_settings=None, **kwargs):
        if ssl:
            return super().Transport(host, connect_timeout, ssl, read_timeout, write_timeout,
                                     socket_settings=socket_settings, **kwargs)
        return ReadAheadTCPTransport(host, connect_timeout=connect_timeout, read_timeout=read_timeout,
                                     write_timeout=write_timeout, socket_settings=socket_settings, **kwargs)


class Transport(pyamqp.Transport):
    Connection = Connection

    def _make_reader(self, connection, timeout=socket.timeout, error=socket.error,
                     _unavail=(errno.EAGAIN, errno.EINTR)):
        """The event loop's reader of the connection: kombu's takes one message per turn of
        the loop, then asks for another turn to read again (which finds the socket empty
        when messages come one at a time). This one goes on while whole frames are
        buffered, up to ``MESSAGES_PER_TURN`` (so that timers and other sockets still get
        their turn), and asks for another turn only when frames are left in its buffer:
        what is still in the socket wakes the loop's poll, which is level-triggered."""
        drain_events = connection.drain_events
        buffered = connection.transport.frame_buffered

        def read(loop):
            if not connection.connected:
                raise RecoverableConnectionError("Socket was disconnected")
            try:
                drain_events(timeout=0)
                for _ in range(MESSAGES_PER_TURN - 1):
                    if not buffered():
                        break
                    drain_events(timeout=0)
            except timeout:
                return
            except error as exc:
                if exc.errno in _unavail:
                    return
                raise
            if buffered():
                loop.call_soon(read, loop)

        return read


def transport_for(broker_url: str) -> str | None:
    """This transport for a broker URL (or a ``;``-separated failover list) of plain AMQP
    URLs; None (the URL's own transport) for anything else."""
    schemes = {urlsplit(url.strip()).scheme for url in broker_url.split(";") if url.strip()}
    return f"{__name__}:Transport" if schemes and schemes <= PLAIN_SCHEMES else None
