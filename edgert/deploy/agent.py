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
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
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
    FdPort,
    FrameError,
    SerialLink,
    decode_frame,
    encode_frame,
    file_reader,
    read_frame,
    socket_reader,
)
from edgert.errors import DeviceError, EdgertError
from edgert.targets import ARM_CHECKED_FLAGS, X86_CHECKED_FLAGS, host_arch, host_cpu_flags

ARTIFACT_SUFFIX = ".edgert"
RESULTS = "results"
CHECKED_FLAGS = set(X86_CHECKED_FLAGS) | set(ARM_CHECKED_FLAGS)


class Agent:
    """The operations of the agent on its folder ``root``; thread-safe (one request at a time)."""

    def __init__(self, root: Path, name: str | None = None, quota_bytes: int | None = None, emulated: bool = False):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name or platform.node()
        self.quota_bytes = quota_bytes
        self.emulated = emulated
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
        size = int(header["size"])
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
        token = uuid.uuid4().hex
        tmp = self.root / f".{dest.name}.{token[:8]}.part"
        self._uploads[token] = {
            "dest": dest,
            "tmp": tmp,
            "file": tmp.open("wb"),
            "size": size,
            "sha256": str(header["sha256"]),
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
        offset = int(header["offset"])
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
            self._check_device_kind(open_artifact(tmp), dest.name)  # hashes, version, and that this device runs it
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

        found = registry.device_op(op)
        if found is None:
            return None
        family, function = found

        def method(header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
            model = self._model(header)
            if model.artifact.family != family.name:
                raise DeviceError(
                    f"'{header['name']}' holds a '{model.artifact.family}' model: {op} needs a {family.name} model"
                )
            reply, data = function(model, header, payload)
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

        from edgert.profile.measure import profile_generator

        self._loaded = None  # load afresh: the load time is part of the profile
        model = self._model(header)
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
        offset, length = int(header.get("offset", 0)), int(header.get("length", 1 << 20))
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(min(length, 1 << 24))
        return {"size": size, "offset": offset}, data


# -- servers -------------------------------------------------------------------------------------


def serve_stream(agent: Agent, read_exact: Any, write: Any) -> None:
    """Answer frames on one connection until it closes; unfinished uploads on it are dropped."""
    tokens: list[str] = []
    try:
        while True:
            try:
                header, payload = read_frame(read_exact)
            except FrameError as exc:
                write(encode_frame({"ok": False, "error": str(exc), "kind": "FrameError"}))
                return  # the stream lost its framing: the peer must reconnect
            except DeviceError:
                return  # closed or cut
            reply, data = agent.handle(header, payload)
            if header.get("op") == "put_begin" and reply.get("ok"):
                tokens.append(reply["upload"])
            write(encode_frame(reply, data))
    finally:
        agent.abort_uploads(tokens)


def tcp_server(agent: Agent, host: str, port: int) -> socketserver.ThreadingTCPServer:
    """A TCP server for ``agent`` on ``host:port`` (0: any free port); call serve_forever."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            serve_stream(agent, socket_reader(self.request, "client"), self.request.sendall)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_serial(agent: Agent, link: SerialLink) -> None:
    """Answer requests arriving as messages on a serial line, forever.

    A reply that cannot be delivered (the host went away, or sent a new request instead of taking
    it) is dropped; the host has given up on it, and its link discards it should it arrive late.
    """
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
            reply = encode_frame(*agent.handle(header, payload))
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
RPC_KEY = "edgert"


def rpc_server(agent: Agent, host: str, port: int) -> tuple[socket.socket, threading.Thread]:
    """A TVM RPC server run in this process (a process under qemu-user cannot start another).

    TVM's own `tvm.rpc.Server` serves each session in a child process; here each session runs
    TVM's `rpc.ServerLoop` on a thread, after the same handshake. Requests reach the agent
    through the global function ``edgert.agent.request(frame) -> frame``.
    """
    import struct

    from edgert.runtime.tvm_runtime import import_tvm

    tvm = import_tvm()  # loads the runtime library, which registers rpc.ServerLoop (and keeps torch out)
    import tvm_ffi  # already imported by tvm, so without torch

    @tvm_ffi.register_global_func("edgert.agent.request", override=True)
    def _request(frame: Any) -> Any:
        header, payload = decode_frame(bytes(frame))
        return bytearray(encode_frame(*agent.handle(header, payload)))

    loop = tvm.get_global_func("rpc.ServerLoop")
    listener = socket.create_server((host, port))

    def session(conn: socket.socket) -> None:
        try:
            recv = socket_reader(conn, "rpc client")
            if struct.unpack("<i", recv(4))[0] != RPC_MAGIC:
                conn.close()
                return
            key = recv(struct.unpack("<i", recv(4))[0]).decode().split()
            if not key or key[0] != f"client:{RPC_KEY}":
                conn.sendall(struct.pack("<i", RPC_MAGIC + 2))  # RPC_CODE_MISMATCH
                conn.close()
                return
            server_key = f"server:{RPC_KEY}".encode()
            conn.sendall(struct.pack("<ii", RPC_MAGIC, len(server_key)) + server_key)
            loop(conn.detach())  # the loop owns the descriptor now and closes it
        except Exception:  # one broken session must not stop the server
            traceback.print_exc()

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=session, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener, thread


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
    args = ap.parse_args(argv)
    agent = Agent(args.root, name=args.name, quota_bytes=args.quota, emulated=args.emulated)

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
        server = tcp_server(agent, args.host, args.port)
        threads.append(threading.Thread(target=server.serve_forever, daemon=True))
        threads[-1].start()
        announce(f"listening on {server.server_address[0]}:{server.server_address[1]}")
    if args.rpc_port is not None:
        listener, thread = rpc_server(agent, args.host, args.rpc_port)
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
