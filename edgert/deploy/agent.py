"""The device agent: keeps artifacts in one folder and runs and profiles them on request.

It runs on the device with the runtime's dependencies only (numpy, the TVM runtime,
tokenizers): it never imports edgert's compiler. Requests and replies are frames of
`edgert.deploy.protocol`; the same `Agent.handle` serves every link::

    python -m edgert.deploy.agent --root DIR [--host 127.0.0.1] [--port P]   # TCP (board://, adb://)
    python -m edgert.deploy.agent --root DIR --stdio                          # over ssh's pipes
    python -m edgert.deploy.agent --root DIR --serial /dev/ttyS0 [--baud B]   # a UART
    python -m edgert.deploy.agent --root DIR --serial-pty FILE                # a new pseudo-terminal
    python -m edgert.deploy.agent --root DIR --rpc-port P                     # TVM RPC, served in-process

Operations (header ``op``): hello, put_begin/put_chunk/put_end (an upload, verified by sha256
and renamed over the old artifact only when whole), list, run, profile, transcribe (Whisper),
codec_roundtrip (a codec, whole or streamed), fetch; opencl_info and opencl_put (the OpenCL runtime
library sent with GPU artifacts, `edgert.deploy.gpu_runtime`). Every path a
request names must lie inside the agent's folder. The TCP and RPC servers bind 127.0.0.1
unless ``--host`` says otherwise.

Security: with ``--secret-file`` every connection must first pass the HMAC challenge-response
of `edgert.deploy.protocol` (one refusal, then the connection is closed); without a secret the
agent binds only a loopback address. Artifacts must be signed by a key the device trusts
(`edgert.artifact.signing`) unless it runs with ``--allow-unsigned``. Resources are bounded:
artifact names ``[A-Za-z0-9._-]+`` without a leading dot, idle connections dropped after
``--idle-timeout`` seconds, at most ``--max-connections`` at once, `MAX_UPLOADS_PER_CONNECTION`
open uploads per connection (`MAX_UPLOADS` in all), offsets and lengths checked.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import os
import platform
import re
import shutil
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from edgert.deploy.gpu_runtime import adopt_shipped, agent_op
from edgert.deploy.protocol import (
    PROTOCOL_VERSION,
    AuthError,
    FdPort,
    FrameError,
    Gate,
    SerialLink,
    decode_frame,
    encode_frame,
    file_reader,
    parse_secret,
    read_frame,
    socket_reader,
)
from edgert.errors import DeviceError, EdgertError
from edgert.targets import ARM_CHECKED_FLAGS, X86_CHECKED_FLAGS, host_arch, host_cpu_flags

ARTIFACT_SUFFIX = ".edgert"
RESULTS = "results"
CHECKED_FLAGS = set(X86_CHECKED_FLAGS) | set(ARM_CHECKED_FLAGS)
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")  # no leading dot: the agent's own files are hidden
MAX_UPLOADS_PER_CONNECTION = 4
MAX_UPLOADS = 16
MAX_CONNECTIONS = 8
IDLE_TIMEOUT = 300.0  # seconds a connection may stay silent, also in the middle of a frame
MAX_FETCH = 1 << 24
MAX_ARTIFACT = 1 << 40


def _int(header: dict[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    """The integer ``header[key]`` within [low, high]; DeviceError naming it otherwise."""
    value = header.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DeviceError(f"'{key}' must be an integer from {low} to {high}, not {value!r}")
    return value


def is_loopback(host: str) -> bool:
    """True if ``host`` is a loopback address (or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Agent:
    """The operations of the agent on its folder ``root``; thread-safe (one request at a time)."""

    def __init__(
        self,
        root: Path,
        name: str | None = None,
        quota_bytes: int | None = None,
        emulated: bool = False,
        secret: bytes | None = None,
    ):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name or platform.node()
        self.quota_bytes = quota_bytes
        self.emulated = emulated
        self.secret = secret  # None: no authentication (loopback only)
        self._lock = threading.Lock()
        self._uploads: dict[str, dict[str, Any]] = {}
        self._loaded: tuple[tuple[Any, ...], Any] | None = None
        self._load_seconds = 0.0
        for stale in self.root.glob(".*.part"):  # uploads cut by a crash or power loss
            stale.unlink()
        adopt_shipped(self.root)  # GPU artifacts run with the OpenCL library the host sent

    # -- dispatch --------------------------------------------------------------------------------
    def handle(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Answer one request; errors become ``{"ok": false, "error": ..., "kind": ...}``."""
        reply, data = self._dispatch(header, payload)
        if "id" in header:  # the host matches replies to requests by it
            reply["id"] = header["id"]
        return reply, data

    def _dispatch(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        op = str(header.get("op", ""))
        method = getattr(self, f"op_{op}", None)
        if method is None:
            method = self._family_op(op) or agent_op(self, op)
        if method is None:
            return {"ok": False, "error": f"unknown operation '{op}'", "kind": "DeviceError"}, b""
        try:
            with self._lock:
                reply, data = method(header, payload)
        except (EdgertError, ValueError) as exc:
            return {"ok": False, "error": str(exc), "kind": type(exc).__name__}, b""
        except Exception as exc:  # a bug on the device: report it rather than drop the link
            traceback.print_exc()
            return {"ok": False, "error": f"agent failed: {type(exc).__name__}: {exc}", "kind": "DeviceError"}, b""
        return {"ok": True, **reply}, data

    def upload_open(self, token: str) -> bool:
        """True while upload ``token`` is under way."""
        return token in self._uploads

    def abort_uploads(self, tokens: list[str]) -> None:
        """Forget unfinished uploads (their link was cut) and delete their partial files."""
        with self._lock:
            for token in tokens:
                up = self._uploads.pop(token, None)
                if up is not None:
                    up["file"].close()
                    Path(up["tmp"]).unlink(missing_ok=True)

    # -- paths -----------------------------------------------------------------------------------
    def inside(self, rel: str) -> Path:
        """``rel`` resolved inside the agent's folder; DeviceError for anything outside it."""
        path = (self.root / rel).resolve()
        if path != self.root and self.root not in path.parents:
            raise DeviceError(f"path '{rel}' is outside the agent's folder {self.root}")
        return path

    def _artifact_path(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise DeviceError(f"path '{name}' is outside the agent's folder {self.root} (give an artifact name)")
        if not NAME.fullmatch(name):
            raise DeviceError(
                f"artifact name '{name[:80]}' is refused: use letters, digits, '.', '_' and '-' "
                "(200 at most), not starting with a dot"
            )
        return self.inside(name)

    def _free_bytes(self) -> int:
        free = shutil.disk_usage(self.root).free
        if self.quota_bytes is not None:
            used = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
            free = min(free, max(0, self.quota_bytes - used))
        return free

    # -- operations ------------------------------------------------------------------------------
    def op_hello(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Who and what the device is."""
        return {
            "protocol": PROTOCOL_VERSION,
            "device": self.name,
            "arch": host_arch(),
            "cpu_flags": sorted(host_cpu_flags() & CHECKED_FLAGS),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "runtime": str(Path(__file__).resolve().parent.parent),
            "root": str(self.root),
            "free_bytes": self._free_bytes(),
            "emulated": self.emulated,
            "artifacts": self._list(),
        }, b""

    def _list(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_file() and p.name.endswith(ARTIFACT_SUFFIX):
                digest = self.root / f".{p.name}.sha256"  # written after a verified upload
                sha = digest.read_text().strip() if digest.is_file() else None
                out.append({"name": p.name, "size": p.stat().st_size, "sha256": sha})
        return out

    def op_list(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """The artifacts in the folder."""
        return {"artifacts": self._list()}, b""

    def op_put_begin(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Start an upload of ``size`` bytes with digest ``sha256`` to ``name``."""
        dest = self._artifact_path(str(header["name"]))
        size = _int(header, "size", 0, MAX_ARTIFACT)
        digest = str(header.get("sha256", ""))
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise DeviceError("'sha256' must be 64 lowercase hex digits")
        free = self._free_bytes()
        if size > free:
            raise DeviceError(
                f"device has too little free disk space for {dest.name}: the upload needs "
                f"{size / 1e6:.1f} MB, {free / 1e6:.1f} MB are free in {self.root}"
            )
        for token, up in list(self._uploads.items()):  # a link without disconnects (serial) may leave one
            if up["dest"] == dest:
                up["file"].close()
                Path(up["tmp"]).unlink(missing_ok=True)
                del self._uploads[token]
        if len(self._uploads) >= MAX_UPLOADS:
            raise DeviceError(f"too many uploads open on the device ({MAX_UPLOADS}): finish or close some first")
        token = uuid.uuid4().hex
        tmp = self.root / f".{dest.name}.{token[:8]}.part"
        self._uploads[token] = {
            "dest": dest,
            "tmp": tmp,
            "file": tmp.open("wb"),
            "size": size,
            "sha256": digest,
            "hash": hashlib.sha256(),
            "received": 0,
        }
        return {"upload": token}, b""

    def _upload(self, header: dict[str, Any]) -> dict[str, Any]:
        up = self._uploads.get(str(header.get("upload")))
        if up is None:
            raise DeviceError("no such upload (it was cut or finished; start again)")
        return up

    def op_put_chunk(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Append a chunk; ``offset`` must be where the file ends (a resent chunk is ignored)."""
        up = self._upload(header)
        offset = _int(header, "offset", 0, up["size"])
        if offset + len(payload) <= up["received"]:
            return {"received": up["received"]}, b""  # a retransmission of a chunk already written
        if offset != up["received"] or up["received"] + len(payload) > up["size"]:
            raise DeviceError(f"upload chunk at offset {offset} does not follow {up['received']} bytes received")
        up["file"].write(payload)
        up["hash"].update(payload)
        up["received"] += len(payload)
        return {"received": up["received"]}, b""

    def op_put_end(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Check the upload's size, sha256 and artifact; only then rename it over the old one."""
        from edgert.artifact.reader import open_artifact
        from edgert.artifact.signing import require_trusted

        token = str(header.get("upload"))
        up = self._upload(header)
        del self._uploads[token]
        up["file"].close()
        tmp, dest = Path(up["tmp"]), up["dest"]
        try:
            if up["received"] != up["size"]:
                raise DeviceError(f"upload of {dest.name} is incomplete: {up['received']} of {up['size']} bytes")
            digest = up["hash"].hexdigest()
            if digest != up["sha256"]:
                raise DeviceError(f"upload of {dest.name} does not match its sha256 ({digest[:16]}… received)")
            artifact = open_artifact(tmp, trust_stamp=False)  # hashes, version, and that this device runs it
            self._check_device_kind(artifact, dest.name)
            require_trusted(artifact.signature(), dest.name)  # no native code is taken unsigned
            (self.root / f".{dest.name}.sha256").unlink(missing_ok=True)
            os.replace(tmp, dest)
            (self.root / f".{dest.name}.sha256").write_text(digest)
        finally:
            tmp.unlink(missing_ok=True)
        if self._loaded is not None and self._loaded[0][0] == dest.name:
            self._loaded = None
        return {"path": str(dest), "sha256": up["sha256"], "size": up["size"]}, b""

    def _check_device_kind(self, artifact: Any, name: str) -> None:
        """Refuse a GPU artifact on the emulated board: qemu emulates the CPU only, there is no OpenCL GPU."""
        if self.emulated and artifact.target.get("kind") == "gpu":
            raise DeviceError(
                f"the emulated board has no GPU: '{name}' runs its kernels on OpenCL (target "
                f"'{artifact.target.get('name')}'); compile it for a CPU target (rpi5) to run it here"
            )

    def _family_op(self, op: str) -> Any:
        """An operation a model family serves (`Family.device_ops`), bound to this agent, or None."""
        from edgert.families import registry

        if registry.device_op(op) is None:
            return None

        def method(header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
            model = self._model(header)
            found = registry.device_op(op, model.artifact.family)  # the model's own family serves it
            if found is None:
                serving = " or ".join(registry.families_serving(op))
                raise DeviceError(
                    f"'{header['name']}' holds a '{model.artifact.family}' model: {op} needs a {serving} model"
                )
            reply, data = found[1](model, header, payload)
            return {**reply, "load_seconds": round(self._load_seconds, 3)}, data

        return method

    def _model(self, header: dict[str, Any]) -> Any:
        """The artifact named in the request, loaded (kept loaded between requests)."""
        from edgert.families.registry import load

        path = self._artifact_path(str(header["name"]))
        if not path.is_file():
            raise DeviceError(f"no artifact '{path.name}' on the device (deploy it first)")
        stat = path.stat()
        key = (path.name, stat.st_mtime_ns, stat.st_size, header.get("threads"), header.get("context"))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None
            if self.emulated:
                from edgert.artifact.reader import open_artifact

                self._check_device_kind(open_artifact(path), path.name)
            t = time.perf_counter()
            model = load(path, threads=header.get("threads"), context_length=header.get("context"))
            self._load_seconds = time.perf_counter() - t
            self._loaded = (key, model)
        return self._loaded[1]

    def op_profile(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Measure load, prefill, per-token decode, per-operator times and peak memory; keep a copy."""
        import json

        from edgert.profile.measure import profile_generator, profile_graph

        self._loaded = None  # load afresh: the load time is part of the profile
        model = self._model(header)
        if model.artifact.family == "graph":  # no prompt: timed calls on inputs made from its specs
            result = profile_graph(
                model,
                runs=int(header.get("runs", 20)),
                input_shapes=header.get("input_shapes"),
                operators=bool(header.get("operators", True)),
            )
        else:
            result = profile_generator(
                model,
                prompt=header.get("prompt"),
                runs=int(header.get("runs", 3)),
                max_tokens=int(header.get("max_tokens", 32)),
                operators=bool(header.get("operators", True)),
            )
        result["load_seconds"] = round(self._load_seconds, 4)
        result["device"] = {"name": self.name, "arch": host_arch(), "emulated": self.emulated, "cpus": os.cpu_count()}
        saved = self.inside(RESULTS) / f"profile-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
        saved.parent.mkdir(exist_ok=True)
        saved.write_text(json.dumps(result, indent=1))
        return {"result": result, "saved": str(saved.relative_to(self.root))}, b""

    def op_fetch(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Bytes ``offset``..``offset+length`` of a file inside the folder (results, artifacts)."""
        path = self.inside(str(header["path"]))
        if not path.is_file():
            raise DeviceError(f"no file '{header['path']}' in the agent's folder")
        size = path.stat().st_size
        offset = _int(header, "offset", 0, size, 0)
        length = _int(header, "length", 0, MAX_FETCH, 1 << 20)
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        return {"size": size, "offset": offset}, data


# -- servers -------------------------------------------------------------------------------------


def gated(gate: Gate, header: dict[str, Any]) -> dict[str, Any] | None:
    """The reply to an authentication step (None: an ordinary request on an open connection).

    Raises AuthError for a request on a connection that has not authenticated: refuse and close.
    """
    if gate.open and header.get("op") not in ("auth", "auth_proof"):
        return None
    reply = gate.step(header) if not gate.open else {"ok": True, "auth": "none" if gate.secret is None else "done"}
    if "id" in header:
        reply["id"] = header["id"]
    return reply


def _refusal(header: dict[str, Any] | None, exc: Exception) -> bytes:
    reply = {"ok": False, "error": str(exc), "kind": type(exc).__name__}
    if header is not None and "id" in header:
        reply["id"] = header["id"]
    return encode_frame(reply)


def serve_stream(agent: Agent, read_exact: Any, write: Any) -> None:
    """Answer frames on one connection until it closes; unfinished uploads on it are dropped.

    Nothing but the authentication is answered before it succeeds (when the agent has a secret).
    """
    tokens: list[str] = []
    gate = Gate(agent.secret)
    try:
        while True:
            try:
                header, payload = read_frame(read_exact)
            except FrameError as exc:
                write(_refusal(None, exc))
                return  # the stream lost its framing: the peer must reconnect
            except DeviceError:
                return  # closed, cut, or idle past the timeout
            try:
                step = gated(gate, header)
            except AuthError as exc:
                write(_refusal(header, exc))
                return  # one refusal, then the connection is closed
            if step is not None:
                write(encode_frame(step))
                continue
            tokens = [t for t in tokens if agent.upload_open(t)]
            if header.get("op") == "put_begin" and len(tokens) >= MAX_UPLOADS_PER_CONNECTION:
                error = DeviceError(f"too many uploads open on this connection ({MAX_UPLOADS_PER_CONNECTION})")
                write(_refusal(header, error))
                continue
            reply, data = agent.handle(header, payload)
            if header.get("op") == "put_begin" and reply.get("ok"):
                tokens.append(reply["upload"])
            write(encode_frame(reply, data))
    finally:
        agent.abort_uploads(tokens)


def tcp_server(
    agent: Agent,
    host: str,
    port: int,
    idle_timeout: float = IDLE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> socketserver.ThreadingTCPServer:
    """A TCP server for ``agent`` on ``host:port`` (0: any free port); call serve_forever.

    A connection silent for ``idle_timeout`` seconds (also in the middle of a frame) is closed;
    past ``max_connections`` open at once, a new one gets a refusal and is closed.
    """
    slots = threading.BoundedSemaphore(max_connections)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            if not slots.acquire(blocking=False):
                error = DeviceError(f"the agent serves {max_connections} connections at most; try again later")
                with contextlib.suppress(OSError):
                    self.request.sendall(_refusal(None, error))
                return
            try:
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.request.settimeout(idle_timeout)
                serve_stream(agent, socket_reader(self.request, "client"), self.request.sendall)
            except OSError:  # the peer went away while a reply was being sent
                pass
            finally:
                slots.release()

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    if agent.secret is None and not is_loopback(host):
        raise AuthError(f"refusing to serve {host} without a device secret (--secret-file): anyone could use it")
    return Server((host, port), Handler)


def serve_serial(agent: Agent, link: SerialLink) -> None:
    """Answer requests arriving as messages on a serial line, forever.

    A reply that cannot be delivered (the host went away, or sent a new request instead of taking
    it) is dropped; the host has given up on it, and its link discards it should it arrive late.
    A line has no connections: a host authenticates once it opens the port, and a failed or new
    ``auth`` closes the line's session again until the next success.
    """
    gate = Gate(agent.secret)
    while True:
        try:
            message = link.receive(None)
        except DeviceError:  # a run of garbled lines: the host will ask again
            continue
        try:
            header, payload = decode_frame(message.data)
        except FrameError as exc:
            reply = encode_frame({"ok": False, "error": str(exc), "kind": "FrameError"})
        else:
            if header.get("op") == "auth" and agent.secret is not None:
                gate = Gate(agent.secret)  # a host opening the line starts a new session
            try:
                step = gated(gate, header)
            except AuthError as exc:
                gate = Gate(agent.secret)
                reply = _refusal(header, exc)
            else:
                reply = encode_frame(step) if step is not None else encode_frame(*agent.handle(header, payload))
        try:
            link.send_message(reply, reply_to=message.id)
        except DeviceError:
            continue


def open_pty() -> tuple[int, str, int]:
    """A new pseudo-terminal in raw mode: (master fd, slave path, slave fd kept open)."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    return master, os.ttyname(slave), slave


RPC_MAGIC = 0xFF271  # TVM RPC handshake (tvm/rpc/base.py); repeated here to keep `tvm.rpc` off the device
# The key only names what a TVM RPC tracker would match a client to; it proves nothing (TVM's
# handshake sends it in the clear). Clients authenticate inside the session, with the frames' HMAC.
RPC_KEY = "edgert"


def rpc_server(
    agent: Agent, host: str, port: int, tracker: tuple[str, int] | None = None, key: str | None = None
) -> tuple[socket.socket, threading.Thread]:
    """A TVM RPC server run in this process (a process under qemu-user cannot start another).

    TVM's own `tvm.rpc.Server` serves each session in a child process; here each session runs
    TVM's `rpc.ServerLoop` on a thread, after the same handshake. Requests reach the agent
    through the global function ``edgert.agent.request(frame) -> frame``. With ``tracker`` the
    server registers with that TVM RPC tracker under ``key`` (`edgert.deploy.tracker_link`) and
    also serves TVM's own RPC functions (upload, load_module: MetaSchedule measures over them).
    """
    import struct

    from edgert.runtime.tvm_runtime import import_tvm

    tvm = import_tvm()  # loads the runtime library, which registers rpc.ServerLoop (and keeps torch out)
    import tvm_ffi  # already imported by tvm, so without torch

    sessions = threading.local()  # each RPC session is served on a thread of its own

    @tvm_ffi.register_global_func("edgert.agent.request", override=True)
    def _request(frame: Any) -> Any:
        header, payload = decode_frame(bytes(frame))
        gate = getattr(sessions, "gate", None)
        if gate is None:  # not an edgert session thread: never open
            gate = Gate(agent.secret or b"\0" * 32)
        try:
            step = gated(gate, header)
        except AuthError as exc:
            sessions.gate = Gate(b"\0" * 32)  # this session stays refused (the secret cannot be all zeros)
            return bytearray(_refusal(header, exc))
        if step is not None:
            return bytearray(encode_frame(step))
        return bytearray(encode_frame(*agent.handle(header, payload)))

    loop = tvm.get_global_func("rpc.ServerLoop")
    if agent.secret is None and not is_loopback(host):
        raise AuthError(f"refusing to serve TVM RPC on {host} without a device secret (--secret-file)")
    listener = socket.create_server((host, port))
    registration = None
    if tracker is not None:
        from edgert.deploy.tracker_link import start_registration

        # TVM's functions load native code without edgert's secret: served on loopback only (tuning
        # on a networked device needs an authenticated loader first, not built yet).
        if is_loopback(host):
            serve_tvm_rpc_env(agent.root / ".rpc")
        registration = start_registration(tracker, key or RPC_KEY, listener.getsockname()[1])

    def session(conn: socket.socket) -> None:
        leased = False
        try:
            recv = socket_reader(conn, "rpc client")
            if struct.unpack("<i", recv(4))[0] != RPC_MAGIC:
                conn.close()
                return
            conn.settimeout(IDLE_TIMEOUT)  # the handshake; the session loop has its own
            length = struct.unpack("<i", recv(4))[0]
            if not 0 < length <= 4096:
                conn.close()
                return
            key = recv(length).decode(errors="replace").split()
            leased = bool(key) and registration is not None and registration.accepts(key[0])
            if not key or (key[0] != f"client:{RPC_KEY}" and not leased):
                conn.sendall(struct.pack("<i", RPC_MAGIC + 2))  # RPC_CODE_MISMATCH
                conn.close()
                return
            server_key = f"server:{RPC_KEY}".encode()
            conn.sendall(struct.pack("<ii", RPC_MAGIC, len(server_key)) + server_key)
            sessions.gate = Gate(agent.secret)
            conn.settimeout(None)  # blocking again: TVM's loop reads the descriptor itself
            loop(conn.detach())  # the loop owns the descriptor now and closes it
        except Exception:  # one broken session must not stop the server
            traceback.print_exc()
        finally:
            if leased and registration is not None:
                registration.session_ended()

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=session, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener, thread


def serve_tvm_rpc_env(folder: Path) -> None:
    """TVM's RPC server functions (as `tvm.rpc.server._server_env`): files go to ``folder``.

    Only the host's RPC runner (MetaSchedule tuning on a leased device) uses them: it uploads a
    kernel library, loads it and times it. A leased session must prove the device's secret first
    for edgert's requests; TVM's functions are reachable by whoever holds a lease, which is why a
    farm binds loopback unless the tracker's network is trusted (README).
    """
    import tvm_ffi

    from edgert.runtime.tvm_runtime import import_tvm

    tvm = import_tvm()

    def inside(name: str) -> str:
        # MetaSchedule's cleanup removes the folder itself (``remove("")``): an empty folder goes,
        # so it is made again for the next upload, as TVM's server makes a fresh one per session.
        folder.mkdir(parents=True, exist_ok=True)
        path = (folder / name).resolve()
        if path != folder.resolve() and folder.resolve() not in path.parents:
            raise ValueError(f"path '{name}' is outside the RPC work folder")
        return str(path)

    tvm_ffi.register_global_func("tvm.rpc.server.workpath", inside, override=True)

    def load_module(name: str) -> Any:
        # MetaSchedule uploads every candidate under the same name, and dlopen hands back the library
        # already loaded from a path: each is loaded from a fresh name (TVM's server has a fresh
        # folder per session for this), which can go once it is loaded.
        path = Path(inside(name))
        fresh = path.with_name(f"{uuid.uuid4().hex}-{path.name}")
        os.link(path, fresh)
        try:
            return tvm.runtime.load_module(str(fresh))
        finally:
            fresh.unlink(missing_ok=True)

    tvm_ffi.register_global_func("tvm.rpc.server.load_module", load_module, override=True)
    if tvm_ffi.get_global_func(RANDOM_FILL, allow_missing=True) is None:
        # The device's runtime-only TVM is built without USE_RANDOM; MetaSchedule's RPC runner fills
        # every kernel argument with it before timing, so without it every candidate failed.
        tvm_ffi.register_global_func(RANDOM_FILL, random_fill_for_measure, override=True)


RANDOM_FILL = "tvm.contrib.random.random_fill_for_measure"


def random_fill_for_measure(tensor: Any) -> None:
    """Fill a kernel argument with random values for timing (TVM's ``random_fill_for_measure``).

    Floats are uniform in [-1, 1); integers 0 or 1, so that index arguments (gather, take) stay in range.
    """
    import numpy as np

    rng = np.random.default_rng()
    dtype = np.dtype(str(tensor.dtype))
    shape = tuple(int(d) for d in tensor.shape)
    if dtype.kind == "f":
        values = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
    else:
        values = rng.integers(0, 2, size=shape).astype(dtype)
    tensor.copyfrom(values)


def main(argv: list[str] | None = None) -> int:
    """Run the agent until it is stopped (SIGTERM, SIGINT) or its stdio link closes."""
    ap = argparse.ArgumentParser(prog="edgert-agent", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="the agent's folder")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ap.add_argument("--port", type=int, default=None, help="TCP port (0: any free one)")
    ap.add_argument("--rpc-port", type=int, default=None, help="TVM RPC port (0: any free one)")
    ap.add_argument("--stdio", action="store_true", help="serve one client on stdin/stdout")
    ap.add_argument("--serial", default=None, help="serve on this serial device")
    ap.add_argument("--baud", type=int, default=115200)
    ap.add_argument("--serial-pty", type=Path, default=None, help="serve on a new pty; write its path here")
    ap.add_argument("--name", default=None, help="device name reported to clients")
    ap.add_argument("--quota", type=int, default=None, help="most bytes the agent's folder may hold")
    ap.add_argument("--emulated", action="store_true", help="report the device as emulated")
    ap.add_argument("--secret-file", type=Path, default=None, help="the device secret (hex) every client must prove")
    ap.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker to register the RPC server with")
    ap.add_argument("--key", default=None, help="the device's key at the tracker (its target name, e.g. rpi5)")
    ap.add_argument("--allow-unsigned", action="store_true", help="run artifacts that no trusted key signed")
    ap.add_argument("--trusted-keys", type=Path, action="append", default=[], help="a folder of trusted *.pub keys")
    ap.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, help="seconds before a silent link is closed")
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="TCP connections served at once")
    args = ap.parse_args(argv)
    from edgert.artifact import signing

    secret = None
    if args.secret_file is not None:
        try:
            secret = parse_secret(args.secret_file.read_text(), str(args.secret_file))
        except OSError as exc:
            ap.error(f"cannot read the device secret: {exc}")
        except AuthError as exc:
            ap.error(str(exc))
    if secret is None and not is_loopback(args.host) and (args.port is not None or args.rpc_port is not None):
        ap.error(f"refusing to bind {args.host} without --secret-file: anyone who reaches it could run code here")
    tracker = None
    if args.tracker is not None:
        from edgert.deploy.tracker_link import parse_address

        try:
            tracker = parse_address(args.tracker)
        except ValueError as exc:
            ap.error(str(exc))
        if args.rpc_port is None or not args.key:
            ap.error("--tracker needs --rpc-port and --key (the server registered is the TVM RPC one)")
    if args.allow_unsigned:
        signing.allow_unsigned(True)
    for folder in args.trusted_keys:
        signing.trust_folder(folder)
    agent = Agent(args.root, name=args.name, quota_bytes=args.quota, emulated=args.emulated, secret=secret)

    if args.stdio:
        stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
        sys.stdout = sys.stderr  # nothing but frames may reach the link

        def write(data: bytes) -> None:
            stdout.write(data)
            stdout.flush()

        serve_stream(agent, file_reader(stdin, "host"), write)
        return 0

    def announce(what: str) -> None:
        print(f"edgert-agent {what}", flush=True)

    threads: list[threading.Thread] = []
    if args.port is not None:
        server = tcp_server(agent, args.host, args.port, args.idle_timeout, args.max_connections)
        threads.append(threading.Thread(target=server.serve_forever, daemon=True))
        threads[-1].start()
        announce(f"listening on {server.server_address[0]}:{server.server_address[1]}")
    if args.rpc_port is not None:
        listener, thread = rpc_server(agent, args.host, args.rpc_port, tracker, args.key)
        threads.append(thread)
        announce(f"rpc on {listener.getsockname()[0]}:{listener.getsockname()[1]}")
    if args.serial is not None or args.serial_pty is not None:
        if args.serial_pty is not None:
            master, slave_path, _slave = open_pty()
            args.serial_pty.write_text(slave_path)
            port: Any = FdPort(master)
            where = slave_path
        else:
            import serial  # pyserial

            from edgert.deploy.protocol import PySerialPort

            port, where = PySerialPort(serial.Serial(args.serial, args.baud)), args.serial
        link = SerialLink(port, name=f"serial {where}")
        threads.append(threading.Thread(target=serve_serial, args=(agent, link), daemon=True))
        threads[-1].start()
        announce(f"serial on {where}")
    if not threads:
        ap.error("give --port, --rpc-port, --serial, --serial-pty or --stdio")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    announce("ready")
    while not stop.wait(1.0):
        if not any(t.is_alive() for t in threads):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
