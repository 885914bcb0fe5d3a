"""Several emulated boards registered with a TVM RPC tracker (`edgert board start --count N --tracker`).

Every board runs the agent under qemu-user from the one cached root file system (`edgert.deploy.board`),
which they share read-only: each has its own folder ``<cache>/board/fleet/<i>`` for its artifacts,
cache, log and secret copy, and its own ports (TCP and TVM RPC, any free ones). The agents register
their RPC servers with the tracker under the target's name; they all prove the secret ``farm-TARGET``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from edgert.deploy.board import (
    PYTHON,
    SITE,
    START_TIMEOUT,
    BoardError,
    Progress,
    _alive,
    _need,
    board_dir,
    build_rootfs,
    precompile,
    precompile_rootfs,
    terminate,
)
from edgert.targets import load_target


def fleet_dir() -> Path:
    """Where the fleet's boards keep their folders: ``<cache>/board/fleet``."""
    path = board_dir() / "fleet"
    path.mkdir(parents=True, exist_ok=True)
    return path


def install_fleet_runtime() -> Path:
    """edgert's runtime and agent, fresh, in the fleet's own folder (a single board's copy in the
    root file system is left to it); byte-compiled here."""
    import io
    import tarfile

    from edgert.deploy.bundle import runtime_tar

    src = fleet_dir() / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(runtime_tar())) as tar:
        tar.extractall(src, filter="data")
    precompile(src)
    return src


def fleet_status() -> list[dict[str, Any]]:
    """The running fleet boards' states (pid, name, ports, tracker, key)."""
    out = []
    for state_file in sorted(fleet_dir().glob("[0-9]*/state.json")):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(state["pid"])):
            out.append(state)
        else:
            state_file.unlink(missing_ok=True)
    return out


def start_fleet(target: str, count: int, tracker: str, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Start ``count`` emulated ``target`` boards that register with ``tracker`` (HOST:PORT) under ``target``."""
    from edgert.deploy.device_secrets import ensure_secret, write_agent_copy
    from edgert.deploy.tracker_link import parse_address

    if count < 1:
        raise BoardError(f"--count must be at least 1, not {count}")
    try:
        parse_address(tracker)
    except ValueError as exc:
        raise BoardError(str(exc)) from exc
    spec = load_target(target)
    if spec.arch != "aarch64" or spec.kind == "gpu":
        raise BoardError(f"the emulated board is an arm64 CPU; target '{target}' is {spec.arch} {spec.kind}")
    if fleet_status():
        raise BoardError("emulated fleet boards already run: `edgert board stop` first")
    rootfs = build_rootfs(progress)
    say = progress or (lambda stage, fraction: None)
    precompile_rootfs(rootfs)
    src = install_fleet_runtime()
    qemu = _need("qemu-aarch64-static", "qemu-user-static")
    secret, _ = ensure_secret(f"farm-{target}")
    # One emulated core each: the boards share the host's cores, and a fleet is about many devices.
    started: list[tuple[subprocess.Popen, Path, dict[str, Any]]] = []
    for i in range(1, count + 1):
        folder = fleet_dir() / str(i)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        secret_file = write_agent_copy(secret, folder / "agent.secret")
        name = f"emulated {target} #{i} ({spec.cpu}, qemu-aarch64)"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": f"{src}:{rootfs / SITE}",
            "EDGERT_HOME": str(src),
            "EDGERT_CACHE": str(folder / "cache"),
            "HOME": str(folder),
            "TVM_USE_RUNTIME_LIB": "1",
            "TVM_NUM_THREADS": "1",
        }
        argv = [qemu, "-L", str(rootfs), "-cpu", spec.cpu, str(rootfs / PYTHON), "-m", "edgert.deploy.agent"]
        argv += ["--root", str(folder / "agent"), "--host", "127.0.0.1", "--port", "0", "--rpc-port", "0"]
        argv += ["--tracker", tracker, "--key", target, "--name", name, "--emulated", "--secret-file", str(secret_file)]
        log = folder / "agent.log"
        say(f"starting board {i} of {count} under qemu-aarch64-static", None)
        with log.open("wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=src, start_new_session=True)
        started.append((proc, log, {"index": i, "name": name, "target": target, "tracker": tracker, "key": target}))
    states = []
    deadline = time.monotonic() + START_TIMEOUT * max(1, count)  # they start at once on shared cores
    for proc, log, state in started:
        text = ""
        while "edgert-agent ready" not in text:
            if proc.poll() is not None or time.monotonic() > deadline:
                for p, _, _ in started:
                    if p.poll() is None:
                        os.kill(p.pid, signal.SIGKILL)
                lines = log.read_text(errors="replace").strip().splitlines()
                raise BoardError(
                    f"board {state['index']}'s agent did not start: {lines[-1] if lines else 'no output'} (see {log})"
                )
            time.sleep(0.25)
            text = log.read_text(errors="replace")
        tcp = re.search(r"listening on ([\d.]+):(\d+)", text)
        rpc = re.search(r"rpc on ([\d.]+):(\d+)", text)
        assert tcp and rpc, text
        state |= {
            "pid": proc.pid,
            "port": int(tcp.group(2)),
            "rpc_port": int(rpc.group(2)),
            "log": str(log),
            "folder": str(log.parent),
            "started": time.time(),
        }
        (log.parent / "state.json").write_text(json.dumps(state, indent=1))
        states.append(state)
    return states


def stop_fleet(index: int | None = None) -> int:
    """Stop the fleet's boards (or board ``index`` only); how many were stopped."""
    stopped = 0
    for state in fleet_status():
        if index is not None and state["index"] != index:
            continue
        terminate(int(state["pid"]))
        (Path(state["folder"]) / "state.json").unlink(missing_ok=True)
        stopped += 1
    return stopped
