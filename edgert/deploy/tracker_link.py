"""The device's side of a farm: the agent's TVM RPC server registers with a TVM RPC tracker.

It speaks the tracker's protocol as TVM's own ``tvm.rpc.server`` does (`tvm/rpc/base.py`,
``_listen_loop`` of `tvm/rpc/server.py`): a magic number, ``UPDATE_INFO`` with ``server:KEY``,
then ``PUT`` of (port, match key). A client that the tracker leases the device to connects with
that match key; until its session ends no new match key is put, so each device serves one lease
at a time. Pure sockets and json: the device imports nothing of ``tvm.rpc`` for this.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from typing import Any

RPC_TRACKER_MAGIC = 0x2F271
# TrackerCode of tvm/rpc/base.py
SUCCESS, PING, PUT, UPDATE_INFO, GET_PENDING_MATCHKEYS = 0, 1, 3, 5, 7
PING_PERIOD = 2.0  # seconds between looks at the tracker's pending keys, as TVM's server
UNMATCHED_TIMEOUT = 4.0  # a key taken by a client that never came is renewed after this


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"tracker address '{text}' must be HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def _send(sock: socket.socket, value: Any) -> None:
    data = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        block = sock.recv(n - len(out))
        if not block:
            raise ConnectionError("the tracker closed the connection")
        out += block
    return bytes(out)


def _recv(sock: socket.socket) -> Any:
    size = struct.unpack("<i", _recv_exact(sock, 4))[0]
    return json.loads(_recv_exact(sock, size).decode())


class TrackerRegistration:
    """Keeps the RPC server at ``port`` registered under ``key`` with the tracker at ``address``."""

    def __init__(self, address: tuple[str, int], key: str, port: int, custom_addr: str | None = None):
        self.address, self.key, self.port, self.custom_addr = address, key, port, custom_addr
        self._lock = threading.Lock()
        self._matchkey: str | None = None  # the key put with the tracker, not yet used by a client
        self._sessions = 0  # leased sessions under way
        self._stop = threading.Event()
        self._used: set[str] = set()

    def accepts(self, client_key: str) -> bool:
        """True if ``client_key`` (``client:MATCHKEY``) is the one the tracker gave out: a lease starts."""
        with self._lock:
            if self._matchkey is None or client_key != f"client:{self._matchkey}":
                return False
            self._matchkey = None
            self._sessions += 1
            return True

    def session_ended(self) -> None:
        """A leased session closed: the device may be put back in the tracker's queue."""
        with self._lock:
            self._sessions = max(0, self._sessions - 1)

    def stop(self) -> None:
        """Stop registering (the thread ends within a ping period)."""
        self._stop.set()

    def run(self) -> None:
        """Register, renew and re-register (the tracker restarted) until stopped."""
        while not self._stop.is_set():
            try:
                with socket.create_connection(self.address, timeout=10) as sock:
                    self._serve(sock)
            except (OSError, ValueError, AssertionError):
                with self._lock:
                    self._matchkey = None  # a new tracker knows none of the old keys
                self._stop.wait(PING_PERIOD)

    def _serve(self, sock: socket.socket) -> None:
        sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
        if struct.unpack("<i", _recv_exact(sock, 4))[0] != RPC_TRACKER_MAGIC:
            raise ValueError(f"{self.address} is not a TVM RPC tracker")
        _send(sock, [UPDATE_INFO, {"key": f"server:{self.key}", "addr": [self.custom_addr, self.port]}])
        assert _recv(sock) == SUCCESS
        unmatched = 0.0
        while not self._stop.is_set():
            with self._lock:
                put = self._matchkey is None and self._sessions == 0
                if put:
                    self._matchkey = self._new_key()
                matchkey = self._matchkey
            if put:
                _send(sock, [PUT, self.key, [self.port, matchkey], self.custom_addr])
                assert _recv(sock) == SUCCESS
                unmatched = 0.0
            time.sleep(PING_PERIOD)
            if matchkey is None:
                _send(sock, [PING])  # in a lease: keep the tracker's connection (and our entry) alive
                _recv(sock)
                continue
            _send(sock, [GET_PENDING_MATCHKEYS])
            pending = _recv(sock)
            with self._lock:
                if self._matchkey != matchkey:
                    continue  # the lease started meanwhile
                # Taken by a client that has not connected: after a while give the tracker a new key.
                unmatched = unmatched + PING_PERIOD if matchkey not in pending else 0.0
                if unmatched > UNMATCHED_TIMEOUT + PING_PERIOD:
                    self._matchkey = None

    def _new_key(self) -> str:
        while True:
            key = f"{self.key}:{random.random()}"
            if key not in self._used:
                self._used.add(key)
                return key


def start_registration(address: tuple[str, int], key: str, port: int) -> TrackerRegistration:
    """Register in a daemon thread; the registration (to check client keys against)."""
    reg = TrackerRegistration(address, key, port)
    threading.Thread(target=reg.run, daemon=True, name="tracker-registration").start()
    return reg
