"""Deploys interrupted at random points: the device must keep a runnable artifact, and a retry must succeed.

A real agent (a child process on its pipes, as over ssh, when it is to be killed; else on a thread)
sits behind a byte stream that fails once, at a seeded random byte offset of what a clean deploy sends and
receives, in one of three ways: the connection is dropped (both pipes closed), the agent is
killed (SIGKILL), or one bit of a frame is flipped. Each case deploys artifact B over artifact A
(then A over B), then checks that the device holds exactly A or exactly B, that it opens and
verifies (hashes and signature), then retries on a fresh agent and checks the new bytes arrived.

    python tools/deploy_faults.py --cases 200 --seed 1      # prints the counts and a JSON summary
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgert.deploy.client import Channel, Device  # noqa: E402
from edgert.deploy.protocol import encode_frame, file_reader, read_frame, socket_reader  # noqa: E402
from edgert.errors import EdgertError  # noqa: E402

KINDS = ("drop", "kill", "corrupt")
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


def run(cases: int, seed: int, folder: Path) -> dict[str, Any]:
    """``cases`` interrupted deploys; the counts of each outcome."""
    a, b = make_artifacts(folder)
    root = folder / "device"
    total = deploy(root, a)  # the bytes of a clean deploy (the same size for B)
    rng = random.Random(seed)
    summary: dict[str, Any] = {"cases": cases, "seed": seed, "old_or_new_kept": 0, "retry_succeeded": 0}
    summary["by_kind"] = {k: 0 for k in KINDS}
    summary["failures"] = []
    old, new = a, b
    for case in range(cases):
        kind = KINDS[case % len(KINDS)]
        at = rng.randrange(total)
        summary["by_kind"][kind] += 1
        try:
            deploy(root, new, at, kind, seed=rng.randrange(1 << 30))
        except EdgertError:
            pass
        kept = holds(root, old, new)
        if kept is not None:
            summary["old_or_new_kept"] += 1
        else:
            summary["failures"].append({"case": case, "kind": kind, "at": at, "what": "device holds neither"})
        try:
            deploy(root, new)
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
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        summary = run(args.cases, args.seed, Path(folder))
    print(
        f"{summary['old_or_new_kept']} of {args.cases} interrupted deploys left a whole, verified artifact; "
        f"{summary['retry_succeeded']} retries succeeded"
    )
    print(json.dumps(summary, indent=1))
    return 0 if not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
