"""Deploys interrupted at random points: the device must keep a runnable artifact, and a retry must succeed.

A real agent sits behind a link that fails once, at a seeded random byte offset of what a clean
deploy carries (both directions), in one of three ways: the connection is dropped, the agent is
killed (SIGKILL), or one bit is flipped. Each case deploys artifact B over artifact A (then A over
B), then checks that the device holds exactly A or exactly B, that it opens and verifies (hashes
and signature), then retries and checks the new bytes arrived. Three links:

- ``pipe``: the agent's own stream (`serve_stream`, as over board:// or ssh's pipes), the fault
  injected in the frames themselves: a flipped bit reaches the agent's frame decoder;
- ``serial``: ``serial://`` to an agent process serving a pseudo-terminal, through a relay that
  fails: a dropped line goes silent, a flipped bit is caught by the packets' CRC and resent;
- ``ssh``: ``ssh://`` through a local ``sshd`` (started here, on 127.0.0.1 with generated keys)
  and a TCP relay: a flipped bit breaks ssh's MAC and ssh ends the session; the agent killed is
  the remote ``python -m edgert.deploy.agent --stdio``.

    python tools/deploy_faults.py --cases 200 --seed 1 --link all   # counts per link, JSON summary
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgert.deploy.client import Channel, Device  # noqa: E402
from edgert.deploy.protocol import encode_frame, file_reader, read_frame, socket_reader  # noqa: E402
from edgert.errors import EdgertError  # noqa: E402

KINDS = ("drop", "kill", "corrupt")
LINKS = ("pipe", "serial", "ssh")
CHUNK = 1 << 16  # several chunks per upload, so faults land between and inside them


class FaultyChannel(Channel):
    """An agent reached through a stream that fails once at byte ``fault_at`` (counted over requests
    and replies together); ``fault_at`` None: a clean link.

    To be killed, the agent runs as a child process on its pipes (as over ssh); otherwise it runs on
    a thread of this process over a socket pair (the same `serve_stream`, and much quicker to start).
    """

    chunk = CHUNK

    def __init__(self, root: Path, fault_at: int | None = None, kind: str = "drop", rng: random.Random | None = None):
        self.fault_at, self.kind, self.rng = fault_at, kind, rng or random.Random(0)
        self.position = 0  # bytes carried so far
        self.fired = self._closed = False
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        if kind == "kill" and fault_at is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            argv = [sys.executable, "-m", "edgert.deploy.agent", "--root", str(root), "--stdio", "--name", "faulty"]
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self._out, self._in = self.proc.stdin, self.proc.stdout
        else:
            from edgert.deploy.agent import Agent, serve_stream

            ours, theirs = socket.socketpair()
            agent = Agent(root, name="faulty")
            args = (agent, socket_reader(theirs, "host"), theirs.sendall)
            self.thread = threading.Thread(target=_serve_then_close, args=(serve_stream, args, theirs), daemon=True)
            self.thread.start()
            self._sock = ours
            self._out, self._in = ours.makefile("wb"), ours.makefile("rb")
        self._read = file_reader(self._in, "faulty link")

    def _hit(self, length: int) -> int | None:
        """The offset inside the next ``length`` bytes where the fault fires, if it does."""
        start, self.position = self.position, self.position + length
        if self.fired or self.fault_at is None or not start <= self.fault_at < start + length:
            return None
        self.fired = True
        return self.fault_at - start

    def _fail(self, data: bytes, at: int, towards_agent: bool) -> bytes:
        """Apply the fault at offset ``at`` of ``data``; what still gets through (corrupt only)."""
        if self.kind == "corrupt":
            bad = bytearray(data)
            bad[at] ^= 1 << self.rng.randrange(8)
            return bytes(bad)
        if towards_agent and at:  # what was sent before the fault arrives
            self._send(data[:at])
        if self.kind == "kill":
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_stream()
        raise EdgertError(f"fault injected: {self.kind} at byte {self.fault_at}")

    def _send(self, data: bytes) -> None:
        try:
            self._out.write(data)
            self._out.flush()
        except OSError as exc:
            raise EdgertError(f"the link was cut ({exc})") from exc

    def exchange(self, header: dict[str, Any], payload: bytes, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        """Send the request through the faulty stream, read the reply through it."""
        frame = encode_frame(header, payload)
        at = self._hit(len(frame))
        if at is not None:
            frame = self._fail(frame, at, towards_agent=True)
        self._send(frame)
        reply_header, reply_payload = read_frame(self._read)  # raises at a cut or a garbled frame
        reply = encode_frame(reply_header, reply_payload)
        at = self._hit(len(reply))
        if at is not None:
            reply = self._fail(reply, at, towards_agent=False)
        return self._answer(header, lambda: read_frame(iter_reader(reply)))

    def _close_stream(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in (self._out, self._in):
            try:
                stream.close()
            except OSError:
                pass
        if self.thread is not None:
            self._sock.shutdown(socket.SHUT_RDWR)  # the agent's next read ends
            self._sock.close()

    def close(self) -> None:
        """End the agent (the end of its stream ends it) and wait for it."""
        self._close_stream()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.thread is not None:
            self.thread.join(timeout=20)


def _serve_then_close(serve: Any, args: tuple, sock: socket.socket) -> None:
    try:
        serve(*args)
    except OSError:  # the host closed while a reply was going out
        pass
    finally:
        sock.close()


def iter_reader(data: bytes) -> Any:
    """``read_exact`` over bytes in memory."""
    view, pos = memoryview(data), 0

    def read_exact(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise EdgertError("the link was cut (a truncated reply)")
        pos += n
        return bytes(view[pos - n : pos])

    return read_exact


def make_artifacts(folder: Path, size: int = 200_000) -> tuple[Path, Path]:
    """Two small signed artifacts of the same name, for this machine, with different bytes."""
    from edgert.artifact.writer import write_artifact
    from edgert.targets import host_arch

    made = []
    for tag in ("a", "b"):
        stage = folder / f"stage-{tag}"
        stage.mkdir(parents=True)
        (stage / "model.so").write_bytes(random.Random(tag).randbytes(size))
        out = folder / tag / "demo.edgert"
        out.parent.mkdir()
        target = {"name": "host", "arch": host_arch(), "cpu_flags": []}
        manifest = {"name": "demo", "family": "llama", "target": target, "library": "model.so"}
        write_artifact(out, manifest, {"model.so": stage / "model.so"})
        made.append(out)
    return made[0], made[1]


def deploy(root: Path, artifact: Path, fault_at: int | None = None, kind: str = "drop", seed: int = 0) -> int:
    """Deploy ``artifact`` to the agent folder ``root`` over a (faulty) link; the bytes the link carried."""
    channel = FaultyChannel(root, fault_at, kind, random.Random(seed))
    try:
        with Device("faulty", "stdio", channel, timeout=60) as dev:
            dev.deploy(artifact)
    finally:
        channel.close()
    return channel.position


def holds(root: Path, *candidates: Path) -> Path | None:
    """Which candidate's exact bytes the device holds (opened, verified and signed), or None."""
    from edgert.artifact.reader import open_artifact

    dest = root / candidates[0].name
    if not dest.is_file():
        return None
    art = open_artifact(dest, trust_stamp=False)
    if not art.signature().trusted:
        return None
    data = dest.read_bytes()
    return next((c for c in candidates if c.read_bytes() == data), None)


class PipeRig:
    """The ``pipe`` link: `FaultyChannel`, an agent per deploy on the device folder ``root``."""

    def __init__(self, folder: Path):
        self.root = folder / "device"

    def deploy(self, artifact: Path, fault_at: int | None = None, kind: str = "drop", seed: int = 0) -> int:
        return deploy(self.root, artifact, fault_at, kind, seed)

    def close(self) -> None:
        """Nothing runs between deploys."""


def _agent_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


class FaultyRelay:
    """Carries bytes between two file descriptors, failing once at byte ``fault_at`` of both
    directions together: ``corrupt`` flips one bit, ``kill`` calls ``on_kill`` (the agent dies, the
    link carries on), ``drop`` discards everything after it until `arm` is called again."""

    def __init__(self) -> None:
        self.fault_at: int | None = None
        self.kind, self.rng = "drop", random.Random(0)
        self.position, self.fired, self.silent = 0, False, False
        self.on_kill: Any = None

    def arm(self, fault_at: int | None, kind: str = "drop", rng: random.Random | None = None) -> None:
        self.fault_at, self.kind, self.rng = fault_at, kind, rng or random.Random(0)
        self.position, self.fired, self.silent = 0, False, False

    def carry(self, data: bytes) -> bytes:
        """What of ``data`` goes on."""
        if self.silent:
            return b""
        start, self.position = self.position, self.position + len(data)
        if self.fired or self.fault_at is None or not start <= self.fault_at < start + len(data):
            return data
        self.fired, at = True, self.fault_at - start
        if self.kind == "corrupt":
            bad = bytearray(data)
            bad[at] ^= 1 << self.rng.randrange(8)
            return bytes(bad)
        if self.kind == "kill":  # the agent dies; the link itself carries on (its end is the agent's to show)
            self.on_kill()
            return data
        self.silent = True
        return data[:at]


class SerialRig:
    """The ``serial`` link: an agent process on a pseudo-terminal (``--serial-pty``), the host on
    another, and a `FaultyRelay` between them on a thread of this process."""

    # A silent line is given up after retries x ack_timeout: short, so that a dropped case is quick.
    QUERY = "retries=3&ack_timeout=0.3"

    def __init__(self, folder: Path):
        self.folder, self.root = folder, folder / "serial-device"
        self.relay = FaultyRelay()
        self.relay.on_kill = self._kill
        self.host_master, self._host_slave = os.openpty()  # the slave stays open: the master never reads EIO
        tty.setraw(self._host_slave)
        os.set_blocking(self.host_master, False)
        self.host_path = os.ttyname(self._host_slave)
        self.proc: subprocess.Popen | None = None
        self.agent_fd: int | None = None
        self._stop = False
        self._start_agent()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _start_agent(self) -> None:
        path_file = self.folder / "agent-pty"
        path_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "edgert.deploy.agent", "--root", str(self.root), "--name", "faulty"]
        argv += ["--serial-pty", str(path_file)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=_agent_env())
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # "edgert-agent ready" once it serves the line
            if b"ready" in line:
                break
        else:
            raise EdgertError(f"the serial agent did not start (exit {self.proc.wait()})")
        fd = os.open(path_file.read_text(), os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        os.set_blocking(fd, False)
        self.agent_fd = fd

    def _kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        fd, self.agent_fd = self.agent_fd, None
        if fd is not None:
            os.close(fd)

    def _pump(self) -> None:
        while not self._stop:
            agent = self.agent_fd
            fds = [self.host_master] + ([agent] if agent is not None else [])
            try:
                ready, _, _ = select.select(fds, [], [], 0.05)
            except (OSError, ValueError):  # the agent's fd closed under us (killed)
                continue
            for fd in ready:
                try:
                    data = os.read(fd, 1 << 16)
                except OSError:
                    continue
                out = self.relay.carry(data)
                dest = self.agent_fd if fd == self.host_master else self.host_master
                if out and dest is not None:
                    with contextlib.suppress(OSError):
                        write_line(dest, out)

    def deploy(self, artifact: Path, fault_at: int | None = None, kind: str = "drop", seed: int = 0) -> int:
        if self.agent_fd is None:  # killed by the last case: a new agent on a new line (cleans its .part files)
            self._start_agent()
        self.relay.arm(fault_at, kind, random.Random(seed))
        from edgert.deploy import parse_device

        query = self.QUERY if fault_at is not None else "retries=6&ack_timeout=1"
        with parse_device(f"serial://{self.host_path}?{query}", timeout=60) as dev:
            dev.deploy(artifact)
        return self.relay.position

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        for fd in (self.agent_fd, self.host_master, self._host_slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def write_line(fd: int, data: bytes) -> None:
    """Write ``data`` to the non-blocking pty ``fd``; what a full buffer (no reader, for half a second)
    cannot take is lost, as on a real line."""
    view, deadline = memoryview(data), time.monotonic() + 0.5
    while view and time.monotonic() < deadline:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            time.sleep(0.002)


def start_sshd(folder: Path) -> tuple[subprocess.Popen, int, Path]:
    """An sshd on 127.0.0.1 (a free port) admitting this user with a key made here: (process, port, key)."""
    sshd = shutil.which("sshd", path="/usr/sbin:/usr/bin")
    if sshd is None:
        raise EdgertError("sshd is missing: tools/setup.sh --test installs openssh-server")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(folder / "sshd_config")], stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, port, folder / "user_key"


class SshRig:
    """The ``ssh`` link: `parse_device("ssh://...")` through a TCP relay in front of a local sshd.
    Each deploy opens two ssh connections (the runtime's copy, then the agent's session); the
    fault lands in the second, counted over its encrypted bytes, handshake included."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.remote = folder / "ssh-remote"
        self.root = self.remote / "artifacts"
        self.sshd, self.sshd_port, self.key = start_sshd(folder / "sshd")
        self.pidfile = folder / "agent.pid"
        # The agent's python writes its pid first (exec keeps it), so that `kill` can find the remote agent.
        self.python = folder / "python-with-pid"
        self.python.write_text(f'#!/bin/sh\necho $$ > {self.pidfile}\nexec {sys.executable} "$@"\n')
        self.python.chmod(0o755)
        self.relay = FaultyRelay()
        self.relay.on_kill = self._kill
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _kill(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(self.pidfile.read_text()), signal.SIGKILL)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.sshd_port))
            faulty = self.connections == 1  # 0: the runtime's copy; 1: the agent's session
            self.connections += 1
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, faulty), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, faulty: bool) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for s in ready:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    out = self.relay.carry(data) if faulty else data
                    if faulty and self.relay.silent and self.relay.kind == "drop":
                        if out:
                            peers[s].sendall(out)
                        return  # the connection dropped: both sides closed below
                    if out:
                        peers[s].sendall(out)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF, None):
                raise
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def deploy(self, artifact: Path, fault_at: int | None = None, kind: str = "drop", seed: int = 0) -> int:
        from edgert.deploy import parse_device

        self.relay.arm(fault_at, kind, random.Random(seed))
        self.connections = 0
        uri = f"ssh://root@127.0.0.1:{self.port}?identity={self.key}&python={self.python}&dir={self.remote}"
        with parse_device(uri, timeout=60) as dev:
            dev.deploy(artifact)
        return self.relay.position

    def close(self) -> None:
        self.listener.close()
        self.sshd.terminate()
        self.sshd.wait(timeout=10)


RIGS = {"pipe": PipeRig, "serial": SerialRig, "ssh": SshRig}


def run(cases: int, seed: int, folder: Path, link: str = "pipe") -> dict[str, Any]:
    """``cases`` interrupted deploys over ``link``; the counts of each outcome."""
    a, b = make_artifacts(folder)
    rig = RIGS[link](folder)
    try:
        return _cases(rig, a, b, cases, seed, link)
    finally:
        rig.close()


def _cases(rig: Any, a: Path, b: Path, cases: int, seed: int, link: str) -> dict[str, Any]:
    root = rig.root
    total = rig.deploy(a)  # the bytes of a clean deploy (about the same for B)
    rng = random.Random(seed)
    summary: dict[str, Any] = {"link": link, "cases": cases, "seed": seed, "interrupted": 0}
    summary.update(old_or_new_kept=0, retry_succeeded=0)
    summary["by_kind"] = {k: 0 for k in KINDS}
    summary["failures"] = []
    old, new = a, b
    for case in range(cases):
        kind = KINDS[case % len(KINDS)]
        at = rng.randrange(total)
        summary["by_kind"][kind] += 1
        try:
            rig.deploy(new, at, kind, seed=rng.randrange(1 << 30))
        except EdgertError:
            summary["interrupted"] += 1  # else the link repaired it (a flipped bit resent over serial)
        kept = holds(root, old, new)
        if kept is not None:
            summary["old_or_new_kept"] += 1
        else:
            summary["failures"].append({"case": case, "kind": kind, "at": at, "what": "device holds neither"})
        try:
            rig.deploy(new)
            if holds(root, new) == new and not list(root.glob(".*.part")):
                summary["retry_succeeded"] += 1
            else:
                summary["failures"].append({"case": case, "kind": kind, "at": at, "what": "retry left other bytes"})
        except EdgertError as exc:
            summary["failures"].append({"case": case, "kind": kind, "at": at, "what": f"retry failed: {exc}"})
        old, new = new, old
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200, help="interrupted deploys per link")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--link", choices=[*LINKS, "all"], default="pipe")
    args = ap.parse_args()
    links = list(LINKS) if args.link == "all" else [args.link]
    summaries = []
    for link in links:
        with tempfile.TemporaryDirectory() as folder:
            began = time.monotonic()
            summary = run(args.cases, args.seed, Path(folder), link)
            summary["seconds"] = round(time.monotonic() - began, 1)
        summaries.append(summary)
        print(
            f"{link:<7} {summary['old_or_new_kept']} of {args.cases} faulty deploys "
            f"({summary['interrupted']} cut short) left a whole, verified artifact; "
            f"{summary['retry_succeeded']} retries succeeded ({summary['seconds']} s)"
        )
    print(json.dumps({"links": summaries}, indent=1))
    return 0 if not any(s["failures"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
