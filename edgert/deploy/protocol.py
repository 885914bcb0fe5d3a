"""The device agent's wire format, shared by the agent and every host-side link.

A *frame* is one request or one reply::

    b"EDGT"  header length (u32 BE)  payload length (u32 BE)  header (JSON)  payload  crc32 (u32 BE)

The CRC covers everything before it, so a frame garbled on the way is refused, never acted on.
Stream links (TCP, ssh's stdio, TVM RPC) carry frames as they are. A serial line also loses and
garbles bytes, so `SerialLink` cuts a frame into packets, each a base64 line with its own CRC,
sent stop-and-wait: a packet is sent again until the other end acknowledges it.

Every request header carries an ``id`` that its reply repeats. A host reads past replies with
another id: answers to requests it gave up on (a timed-out TCP read, a serial line that garbled
everything) may still arrive, and must never be taken for the answer awaited.

Authentication: an agent that holds a secret (32 random bytes made when it is installed) answers
nothing on a connection until the host proves it knows that secret, and proves its own knowledge
first: the host sends ``auth`` with a nonce, the agent answers with its nonce and
HMAC-SHA256(secret, "edgert-agent" | host nonce | agent nonce), the host checks it and sends
``auth_proof`` with HMAC-SHA256(secret, "edgert-host" | agent nonce | host nonce). The labels
keep either side's proof from serving as the other's; fresh nonces from both make replays useless.
Any other first request, or a wrong proof, gets one refusal and the connection is closed.

Only the standard library is used: the agent runs on devices with the runtime's dependencies alone.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import json
import os
import secrets
import select
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from edgert.errors import DeviceError

MAGIC = b"EDGT"
PROTOCOL_VERSION = 2  # 2: request ids in frames, serial replies name their request
_PREFIX = struct.Struct(">4sII")
_CRC = struct.Struct(">I")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 26
CHUNK = 1 << 20  # upload chunk on stream links


class FrameError(DeviceError):
    """A frame arrived garbled (bad magic, impossible length or CRC mismatch)."""


class AuthError(DeviceError):
    """A connection did not prove knowledge of the device's secret (or the agent did not prove its own)."""


SECRET_BYTES = 32
_NONCE_BYTES = 32


def new_secret() -> bytes:
    """A fresh device secret."""
    return secrets.token_bytes(SECRET_BYTES)


def parse_secret(text: str, where: str = "secret") -> bytes:
    """A secret written as hex (how it is stored and printed)."""
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise AuthError(f"{where}: not a hex device secret") from exc
    if len(secret) < 16:
        raise AuthError(f"{where}: a device secret has at least 16 bytes")
    return secret


def _proof(secret: bytes, label: bytes, first: bytes, second: bytes) -> str:
    return hmac.new(secret, label + b"|" + first + b"|" + second, "sha256").hexdigest()


def _nonce(header: dict[str, Any], key: str) -> bytes:
    value = header.get(key)
    try:
        nonce = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        nonce = b""
    if len(nonce) != _NONCE_BYTES:
        raise AuthError(f"authentication: '{key}' is not a {_NONCE_BYTES}-byte hex nonce")
    return nonce


class Gate:
    """The agent's side of the challenge-response on one connection."""

    def __init__(self, secret: bytes | None):
        self.secret = secret
        self.open = secret is None  # an agent without a secret (loopback only) asks for nothing
        self._nonces: tuple[bytes, bytes] | None = None

    def step(self, header: dict[str, Any]) -> dict[str, Any]:
        """The reply to a request on a connection not yet open; raises AuthError to refuse and close."""
        op = header.get("op")
        if self.secret is None:
            return {"ok": True, "auth": "none"}
        if op == "auth" and self._nonces is None:
            host, mine = _nonce(header, "nonce"), secrets.token_bytes(_NONCE_BYTES)
            self._nonces = (host, mine)
            return {"ok": True, "nonce": mine.hex(), "proof": _proof(self.secret, b"edgert-agent", host, mine)}
        if op == "auth_proof" and self._nonces is not None:
            host, mine = self._nonces
            want = _proof(self.secret, b"edgert-host", mine, host)
            if hmac.compare_digest(want, str(header.get("proof", ""))):
                self.open = True
                return {"ok": True}
            raise AuthError("authentication failed: wrong device secret")
        raise AuthError(f"not authenticated: '{op}' refused (this agent needs its device secret)")


def authenticate(exchange: Callable[[dict[str, Any]], dict[str, Any]], secret: bytes, where: str) -> None:
    """The host's side: prove knowledge of ``secret`` to the agent, after it proved its own.

    ``exchange(header)`` sends one request and returns the reply header.
    """
    host = secrets.token_bytes(_NONCE_BYTES)
    reply = exchange({"op": "auth", "nonce": host.hex()})
    if not reply.get("ok"):
        raise AuthError(f"{where}: the agent refused authentication ({reply.get('error')})")
    if reply.get("auth") == "none":
        raise AuthError(f"{where}: the agent holds no device secret; refusing to trust it with the secret's proof")
    agent = _nonce(reply, "nonce")
    if not hmac.compare_digest(_proof(secret, b"edgert-agent", host, agent), str(reply.get("proof", ""))):
        raise AuthError(f"{where}: the agent could not prove it holds this device's secret (another device?)")
    reply = exchange({"op": "auth_proof", "proof": _proof(secret, b"edgert-host", agent, host)})
    if not reply.get("ok"):
        raise AuthError(f"{where}: {reply.get('error')}")


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One frame holding ``header`` (JSON) and ``payload``."""
    head = json.dumps(header, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, len(head), len(payload)) + head + payload
    return body + _CRC.pack(zlib.crc32(body))


def read_frame(read_exact: Callable[[int], bytes]) -> tuple[dict[str, Any], bytes]:
    """Read one frame with ``read_exact(n)`` (n bytes, or raise); check its CRC; (header, payload)."""
    prefix = read_exact(_PREFIX.size)
    magic, hlen, plen = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"garbled frame: bad magic {magic!r} (is this an edgert agent?)")
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise FrameError(f"garbled frame: impossible lengths (header {hlen}, payload {plen})")
    rest = read_exact(hlen + plen + _CRC.size)
    (crc,) = _CRC.unpack(rest[-_CRC.size :])
    if crc != zlib.crc32(prefix + rest[: -_CRC.size]):
        raise FrameError("garbled frame: CRC mismatch")
    try:
        header = json.loads(rest[:hlen])
    except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 too
        raise FrameError(f"garbled frame: header is not JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise FrameError(f"garbled frame: header is a JSON {type(header).__name__}, not an object")
    return header, rest[hlen : hlen + plen]


def decode_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a frame held in memory."""
    view = memoryview(data)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise FrameError(f"garbled frame: {len(view)} bytes, truncated")
        pos += n
        return bytes(view[pos - n : pos])

    return read_frame(take)


def socket_reader(sock: Any, what: str) -> Callable[[int], bytes]:
    """``read_exact`` over a socket; a closed connection raises DeviceError naming ``what``."""

    def read_exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                block = sock.recv(min(n - len(buf), 1 << 20))
            except TimeoutError as exc:
                raise DeviceError(f"{what}: no answer (timed out)") from exc
            except OSError as exc:
                raise DeviceError(f"{what}: the link was cut ({exc})") from exc
            if not block:
                raise DeviceError(f"{what}: the link was cut (connection closed)")
            buf += block
        return bytes(buf)

    return read_exact


def file_reader(fh: Any, what: str) -> Callable[[int], bytes]:
    """``read_exact`` over a binary file object (a pipe); end of file raises DeviceError."""

    def read_exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            block = fh.read(n - len(buf))
            if not block:
                raise DeviceError(f"{what}: the link was cut (end of stream)")
            buf += block
        return bytes(buf)

    return read_exact


# -- serial lines ------------------------------------------------------------------------------


class Port(Protocol):
    """The two calls `SerialLink` needs from a serial port."""

    def read_some(self, timeout: float | None) -> bytes: ...

    def write(self, data: bytes) -> None: ...


class FdPort:
    """A port over a file descriptor (the agent's end of a pseudo-terminal, or a tty it opened)."""

    def __init__(self, fd: int):
        self.fd = fd

    def read_some(self, timeout: float | None) -> bytes:
        """Whatever bytes arrive within ``timeout`` seconds (b"" if none)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self.fd, 1 << 16)
        except OSError:  # a pty master reads EIO while no one holds the other end
            time.sleep(0.05)
            return b""

    def write(self, data: bytes) -> None:
        """Write all of ``data``."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]


class PySerialPort:
    """A port over a `serial.Serial` (pyserial) object."""

    def __init__(self, serial_port: Any):
        self.port = serial_port

    def read_some(self, timeout: float | None) -> bytes:
        """Whatever bytes arrive within ``timeout`` seconds (b"" if none)."""
        self.port.timeout = timeout
        first = self.port.read(1)
        if not first:
            return b""
        return first + self.port.read(self.port.in_waiting)

    def write(self, data: bytes) -> None:
        """Write all of ``data``."""
        self.port.write(data)
        self.port.flush()


_DATA, _ACK, _NAK = 1, 2, 3
_PACKET = struct.Struct(">BIIIB")  # kind, message id, id of the message it answers (0: none), packet index, last
_MAX_LINE = 1 << 17


class Superseded(DeviceError):
    """The peer sent a new request while a reply to its previous one was still going out: it gave up on it."""


@dataclass
class Message:
    """A whole message received on a serial line."""

    id: int
    reply_to: int  # the id of the message this one answers; 0 for a request
    data: bytes


class SerialLink:
    """Whole messages over a line that garbles bytes: CRC'd base64 packets, acknowledged one by one.

    Written here (not taken from a library) because the device side must run with the standard
    library alone; the scheme is the classic stop-and-wait ARQ. Every packet carries its message
    id and index, so a retransmitted packet is recognised and acknowledged again, never delivered twice,
    and a reply names the request it answers, so a stale reply (to a request an earlier connection gave
    up on, still being resent by the other end) is told apart from the answer awaited, and dropped.
    """

    def __init__(
        self, port: Port, name: str = "serial", packet_size: int = 8192, ack_timeout: float = 2.0, retries: int = 12
    ):
        self.port, self.name = port, name
        self.packet_size, self.ack_timeout, self.retries = packet_size, ack_timeout, retries
        self._buf = b""
        self._rx: list[Any] | None = None  # [message id, reply_to, next index, chunks]
        self._done: collections.deque[int] = collections.deque(maxlen=16)
        self._complete: collections.deque[Message] = collections.deque()
        self.retransmissions = 0
        self.discarded = 0  # whole messages dropped as stale replies

    # -- sending ---------------------------------------------------------------------------------
    def send_message(self, data: bytes, reply_to: int = 0) -> int:
        """Send ``data`` (answering message ``reply_to``, if not 0), resending each packet until it is
        acknowledged; its message id. A reply the peer stops waiting for (it sends a new request)
        raises `Superseded`."""
        msg = int.from_bytes(os.urandom(4), "big") or 1
        chunks = [data[i : i + self.packet_size] for i in range(0, len(data), self.packet_size)] or [b""]
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            line = self._line(_DATA, msg, reply_to, index, last, chunk)
            for attempt in range(self.retries):
                if attempt:
                    self.retransmissions += 1
                self.port.write(line)
                if self._await_ack(msg, index, reply_to != 0):
                    break
            else:
                raise DeviceError(
                    f"{self.name}: packet {index + 1} of {len(chunks)} was not acknowledged after "
                    f"{self.retries} tries (garbled frames on the line, or no agent at the other end)"
                )
        return msg

    def _await_ack(self, msg: int, index: int, replying: bool) -> bool:
        deadline = time.monotonic() + self.ack_timeout
        while True:
            packet = self._next_packet(deadline)
            if packet is None:
                return False
            if packet == "garbled":
                return False  # perhaps our acknowledgement: send again at once
            kind, m, reply_to, i, _, _ = packet
            if kind == _ACK and (m, i) == (msg, index):
                return True
            if kind == _NAK and m in (msg, 0):
                return False
            if kind == _DATA:
                self._on_data(packet)
                if reply_to == msg:
                    return True  # the other end is answering this very message: it has all of it
                if replying and any(done.reply_to == 0 for done in self._complete):
                    raise Superseded(f"{self.name}: the other end sent a new request before taking this reply")

    # -- receiving -------------------------------------------------------------------------------
    def receive(self, timeout: float | None = None, reply_to: int | None = None) -> Message:
        """The next whole message; with ``reply_to``, the next one answering that message (stale
        replies to other messages are dropped). DeviceError after ``timeout`` seconds (None: wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        garbled = 0  # lines in a row that failed their checks
        while True:
            while self._complete:
                message = self._complete.popleft()
                if reply_to is None or message.reply_to == reply_to:
                    return message
                self.discarded += 1
            packet = self._next_packet(deadline)
            if packet is None:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeviceError(f"{self.name}: no answer within {timeout:.0f} s")
                continue
            if packet == "garbled":
                # The sender resends a packet `retries` times, then drops the message: past that many
                # garbled lines in a row nothing whole will come, and waiting on would hang.
                garbled += 1
                if garbled > self.retries:
                    self._rx = None
                    raise DeviceError(
                        f"{self.name}: the answer was still garbled after {self.retries} tries "
                        "(garbled frames on the line, or a wrong baud rate)"
                    )
                rx = self._rx
                self.port.write(self._line(_NAK, rx[0] if rx else 0, 0, rx[2] if rx else 0, False, b""))
                continue
            garbled = 0
            if packet[0] == _DATA:
                self._on_data(packet)

    def recv_message(self, timeout: float | None = None, reply_to: int | None = None) -> bytes:
        """The data of `receive`'s message."""
        return self.receive(timeout, reply_to).data

    def _on_data(self, packet: tuple[int, int, int, int, bool, bytes]) -> None:
        _, msg, reply_to, index, last, data = packet
        if msg in self._done:
            self.port.write(self._line(_ACK, msg, 0, index, False, b""))  # our acknowledgement was lost
            return
        if self._rx is None or self._rx[0] != msg:
            if index != 0:
                self.port.write(self._line(_NAK, msg, 0, 0, False, b""))
                return
            self._rx = [msg, reply_to, 0, []]
        rx = self._rx
        if index == rx[2]:
            rx[3].append(data)
            rx[2] += 1
            self.port.write(self._line(_ACK, msg, 0, index, False, b""))
            if last:
                self._complete.append(Message(msg, rx[1], b"".join(rx[3])))
                self._done.append(msg)
                self._rx = None
        elif index < rx[2]:
            self.port.write(self._line(_ACK, msg, 0, index, False, b""))
        else:
            self.port.write(self._line(_NAK, msg, 0, rx[2], False, b""))

    # -- lines -----------------------------------------------------------------------------------
    @staticmethod
    def _line(kind: int, msg: int, reply_to: int, index: int, last: bool, data: bytes) -> bytes:
        body = _PACKET.pack(kind, msg, reply_to, index, last) + data
        return base64.b64encode(body + _CRC.pack(zlib.crc32(body))) + b"\n"

    def _next_packet(self, deadline: float | None) -> tuple[int, int, int, int, bool, bytes] | str | None:
        """The next packet, "garbled" for a line that fails its checks, None at the deadline."""
        while b"\n" not in self._buf:
            if len(self._buf) > _MAX_LINE:  # a lost newline: drop what cannot be a packet
                self._buf = b""
                return "garbled"
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._buf += self.port.read_some(left if left is not None else 1.0)
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            raw = base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            return "garbled"
        if len(raw) < _PACKET.size + _CRC.size or _CRC.unpack(raw[-4:])[0] != zlib.crc32(raw[:-4]):
            return "garbled"
        kind, msg, reply_to, index, last = _PACKET.unpack(raw[: _PACKET.size])
        return kind, msg, reply_to, index, bool(last), raw[_PACKET.size : -4]
