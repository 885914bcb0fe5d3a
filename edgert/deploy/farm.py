"""A device farm on TVM's RPC tracker: start and stop the tracker, list devices, lease them, profile a fleet.

The tracker is TVM's own (``python -m tvm.exec.rpc_tracker``), run in the background with a pid
file in ``<cache>/farm``. Devices register with it under a key (their target name): each agent
run with ``--rpc-port P --tracker HOST:PORT --key rpi5`` (`edgert.deploy.tracker_link`), or TVM's
RPC server/app for tuning only. A lease is a TVM RPC session the tracker hands out; over it
edgert's frames travel as with an ``rpc://`` link, authenticated with the device secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgert.deploy.client import Device, RpcChannel
from edgert.deploy.tracker_link import parse_address
from edgert.errors import DeviceError
from edgert.paths import cache_dir

DEFAULT_PORT = 9190


def farm_dir() -> Path:
    """Where the tracker's pid file and log live: ``<cache>/farm``."""
    path = cache_dir() / "farm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); DeviceError naming the problem."""
    try:
        return parse_address(text)
    except ValueError as exc:
        raise DeviceError(str(exc)) from exc


def tracker_state() -> dict[str, Any] | None:
    """The running tracker started here (pid, host, port, log), or None."""
    state_file = farm_dir() / "tracker.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    if not _alive(int(state["pid"])):
        state_file.unlink(missing_ok=True)
        return None
    return state


def start_tracker(host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> dict[str, Any]:
    """Start TVM's RPC tracker in the background; its state. Binds loopback unless ``host`` says otherwise."""
    running = tracker_state()
    if running is not None:
        if (running["host"], running["port"]) == (host, port):
            return running
        raise DeviceError(f"a tracker already runs on {running['host']}:{running['port']}: `edgert farm stop` first")
    with socket.socket() as probe:  # TVM's tracker would move to the next port silently
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DeviceError(f"cannot start the tracker on {host}:{port} ({exc.strerror or exc})") from exc
    log = farm_dir() / "tracker.log"
    argv = [
        sys.executable,
        "-m",
        "tvm.exec.rpc_tracker",
        "--host",
        host,
        "--port",
        str(port),
        "--port-end",
        str(port + 1),
    ]
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                lines = log.read_text(errors="replace").strip().splitlines()
                if proc.poll() is None:
                    proc.kill()
                why = lines[-1] if lines else "no output"
                raise DeviceError(f"the tracker did not start: {why} (see {log})") from exc
            time.sleep(0.2)
    state = {"pid": proc.pid, "host": host, "port": port, "log": str(log), "started": time.time()}
    (farm_dir() / "tracker.json").write_text(json.dumps(state))
    return state


def stop_tracker() -> bool:
    """Stop the tracker started here; False if none ran."""
    state = tracker_state()
    if state is None:
        return False
    pid = int(state["pid"])
    # Its own process group (started in a new session): TVM serves the tracker from a worker child.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    (farm_dir() / "tracker.json").unlink(missing_ok=True)
    return True


def _tracker(tracker: str) -> Any:
    import tvm.rpc

    host, port = address(tracker)
    try:  # TVM's client retries an unreachable tracker for a minute, logging each try
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        why = exc.strerror or exc
        raise DeviceError(f"cannot reach the RPC tracker at {tracker} ({why}; is `edgert farm start` on?)") from exc
    try:
        return tvm.rpc.connect_tracker(host, port)
    except Exception as exc:  # TVM raises RuntimeError or its own error for an unreachable tracker
        raise DeviceError(f"cannot reach the RPC tracker at {tracker} (is `edgert farm start` running?)") from exc


def summary(tracker: str) -> dict[str, Any]:
    """The tracker's summary as devices by key: ``{key: {"free": n, "leased": n, "pending": n, "devices": [...]}}``.

    A device is a registered server (its address); ``free`` counts those waiting in the key's queue,
    ``leased`` the registered ones that are not (in a session with a client).
    """
    raw = _tracker(tracker).summary()
    out: dict[str, dict[str, Any]] = {}
    for server in raw.get("server_info", []):
        key = str(server["key"]).removeprefix("server:")
        addr = server.get("addr") or [None, None]
        entry = out.setdefault(key, {"free": 0, "leased": 0, "pending": 0, "devices": []})
        entry["devices"].append(f"{addr[0]}:{addr[1]}")
    for key, queue in raw.get("queue_info", {}).items():
        entry = out.setdefault(key, {"free": 0, "leased": 0, "pending": 0, "devices": []})
        entry["free"], entry["pending"] = int(queue.get("free", 0)), int(queue.get("pending", 0))
    for entry in out.values():
        entry["leased"] = max(0, len(entry["devices"]) - entry["free"])
    return out


class LeasedChannel(RpcChannel):
    """An `RpcChannel` over a session the tracker leased (the lease ends when it closes)."""

    def __init__(self, session: Any, where: str):
        self.where, self.session = where, session
        try:
            self.func = session.get_function("edgert.agent.request")
        except Exception as exc:
            raise DeviceError(f"{where}: the leased device runs no edgert agent ({exc})") from exc

    def close(self) -> None:
        """Drop the session: the device goes back to the tracker's queue."""
        self.session = self.func = None


def _secret(key: str, name: str | None) -> bytes | None:
    """The secret for devices of ``key``: ``name``'s, else $EDGERT_DEVICE_SECRET, else ``farm-KEY``'s,
    else the board's."""
    from edgert.deploy import device_secrets

    if name is not None:
        secret = device_secrets.load_secret(name)
        if secret is None:
            raise DeviceError(f"no device secret named '{name}' here ({device_secrets.secret_path(name)})")
        return secret
    return (
        device_secrets.from_environment()
        or device_secrets.load_secret(f"farm-{key}")
        or device_secrets.load_secret("board")
    )


def lease(tracker: str, key: str, count: int | str = "all", secret: str | None = None) -> list[Device]:
    """Lease ``count`` (or all free) devices of ``key``; each an authenticated `Device`."""
    free = summary(tracker).get(key, {}).get("free", 0)
    wanted = free if count == "all" else int(count)
    if free == 0 or wanted < 1:
        raise DeviceError(f"no free device with key '{key}' at the tracker {tracker} (see `edgert farm status`)")
    if wanted > free:
        raise DeviceError(f"{wanted} devices with key '{key}' asked for, the tracker {tracker} has {free} free")
    client, proof = _tracker(tracker), _secret(key, secret)
    devices: list[Device] = []
    try:
        for i in range(wanted):
            try:
                session = client.request(key, priority=1, session_timeout=0, max_retry=2)
            except Exception as exc:
                raise DeviceError(f"the tracker {tracker} could not lease a '{key}' device ({exc})") from exc
            where = f"{key}#{i + 1} via {tracker}"
            dev = Device(where, "rpc", LeasedChannel(session, where))
            devices.append(dev)
            if proof is not None:
                dev.authenticate(proof)
    except BaseException:
        for dev in devices:
            dev.close()
        raise
    return devices


Progress = Callable[[str], None]
# Per call to a leased device: an upload chunk or a whole profile (SmolLM2 on an emulated board
# takes minutes), so generous; a device past it is reported as hung.
CALL_TIMEOUT = 900.0


def _profile_one(dev: Device, artifact: Path, options: dict[str, Any]) -> dict[str, Any]:
    from edgert.deploy.remote import ship_gpu_runtime

    hello = dev.hello()
    if not dev.holds(artifact):
        dev.deploy(artifact)
    else:
        ship_gpu_runtime(dev, artifact)
    result = dev.profile(artifact.name, **{k: v for k, v in options.items() if v is not None})
    result["link"] = {"uri": dev.uri, "kind": "rpc (tracker lease)"}
    result["device"] = {**result.get("device", {}), "name": hello["device"], "emulated": hello.get("emulated")}
    return result


def fleet_profile(
    artifact: str | Path,
    tracker: str,
    key: str,
    report: str | Path,
    devices: int | str = "all",
    secret: str | None = None,
    log: Progress | None = None,
    call_timeout: float = CALL_TIMEOUT,
    **options: Any,
) -> dict[str, Path]:
    """Lease devices of ``key``, deploy and profile ``artifact`` on each in parallel, write one fleet report.

    A device that fails (refuses the artifact, drops mid-run, or leaves one call unanswered for
    ``call_timeout`` seconds while keeping its connection) is named with its reason in the report;
    the others finish.
    """
    from edgert.errors import OutputPathError
    from edgert.profile.report import write_fleet_report

    artifact, report = Path(artifact), Path(report)
    if not report.parent.is_dir():
        raise OutputPathError(f"cannot write the report {report}: folder {report.parent} does not exist")
    leased = lease(tracker, key, devices, secret)
    for dev in leased:
        dev.timeout = call_timeout
    results: list[dict[str, Any] | None] = [None] * len(leased)
    failures: list[dict[str, Any]] = []
    names = []
    for dev in leased:
        try:
            names.append(dev.name)
        except Exception:  # asked again (and reported) in its thread
            names.append(dev.uri)

    def work(i: int, dev: Device) -> None:
        try:
            results[i] = _profile_one(dev, artifact, options)
            if log:
                log(f"{names[i]}: done")
        except Exception as exc:
            if not isinstance(exc, DeviceError):
                traceback.print_exc()
            why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            failures.append({"device": names[i], "lease": dev.uri, "error": why, "kind": type(exc).__name__})
            if log:
                log(f"{names[i]}: failed ({why})")

    threads = [threading.Thread(target=work, args=(i, dev), daemon=True) for i, dev in enumerate(leased)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for dev in leased:
            try:
                dev.close()
            except Exception:
                pass
    done = [r for r in results if r is not None]
    return write_fleet_report(done, failures, report, {"tracker": tracker, "key": key, "artifact": artifact.name})
