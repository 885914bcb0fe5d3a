"""Device URIs and the links they select.

local                              an agent in this process, folder <cache>/deployed
board://HOST:PORT                  the emulated board's agent (board:// alone: the running board)
ssh://user@host[:port]             copies the runtime and agent over ssh, runs the agent on ssh's pipes
                                   (?python=python3 &dir=.edgert-agent &identity=KEYFILE)
adb://SERIAL                       pushes the runtime, starts the agent, forwards a port (?python=...)
rpc://HOST:PORT                    TVM RPC to an agent serving RPC in-process
serial:///dev/ttyX?baud=115200     a UART: CRC'd packets with retransmission (&retries=N)

Every link but local and ssh (whose pipes ssh itself authenticates) proves the device's secret to
its agent first (`edgert.deploy.protocol`): the secret named by ``?secret=NAME`` (kept in
``<config>/devices/NAME.secret``), else ``$EDGERT_DEVICE_SECRET``, else the running board's
("board") for its URIs, else the phone's ("adb-SERIAL") for adb://.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edgert.deploy.bundle import runtime_tar
from edgert.deploy.client import Device, InProcessChannel, ProcessChannel, RpcChannel, SerialChannel, SocketChannel
from edgert.errors import DeviceError
from edgert.paths import cache_dir

LINKS = ("local", "board", "ssh", "adb", "rpc", "serial")
# What a device needs of edgert: the runtime, the agent and the on-device measurements.
AGENT_PORT = 7709


def _host_port(parts: Any, uri: str, default_port: int | None = None) -> tuple[str, int]:
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise DeviceError(f"device '{uri}': bad port ({exc})") from exc
    if not parts.hostname or port is None:
        raise DeviceError(f"device '{uri}' needs HOST:PORT")
    return parts.hostname, port


def parse_device(uri: str, timeout: float = 3600.0) -> Device:
    """Open the device that ``uri`` names (see the module's docstring for the forms), authenticated."""
    device = _open(uri, timeout)
    if device.link in ("local", "ssh"):
        return device
    try:
        secret = _secret_for(device.link, urlsplit(uri))
        if secret is not None:
            device.authenticate(secret)
    except BaseException:
        device.close()
        raise
    return device


def _secret_for(link: str, parts: Any) -> bytes | None:
    """The secret to prove on a link to ``parts`` (see the module's docstring), or None."""
    from edgert.deploy import device_secrets

    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if "secret" in query:
        name = query["secret"]
        secret = device_secrets.load_secret(name)
        if secret is None:
            raise DeviceError(f"no device secret named '{name}' here ({device_secrets.secret_path(name)})")
        return secret
    secret = device_secrets.from_environment()
    if secret is not None:
        return secret
    if link == "adb":
        return device_secrets.load_secret(f"adb-{parts.netloc}")
    if link in ("board", "rpc", "serial"):
        from edgert.deploy.board import status

        state = status()
        if state is None:
            return None
        ours = {("board", "127.0.0.1", state["port"]), ("rpc", "127.0.0.1", state["rpc_port"])}
        if (link == "board" and not parts.netloc) or (link, parts.hostname, parts.port) in ours:
            return device_secrets.load_secret("board")
        if link == "serial" and parts.path == state.get("serial"):
            return device_secrets.load_secret("board")
    return None


def _open(uri: str, timeout: float) -> Device:
    if uri in ("local", "local://"):
        from edgert.deploy.agent import Agent

        root = cache_dir() / "deployed"
        device = Device("local", "local", InProcessChannel(Agent(root, name="local")), timeout)
        device.root = root
        return device
    scheme = uri.split("://", 1)[0] if "://" in uri else uri
    if scheme not in LINKS:
        raise DeviceError(f"device link '{scheme}' is not available in this edgert (available: {', '.join(LINKS)})")
    parts = urlsplit(uri)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if scheme == "board":
        if not parts.netloc:
            from edgert.deploy.board import running_board

            state = running_board()
            host, port = "127.0.0.1", int(state["port"])
        else:
            host, port = _host_port(parts, uri)
        connect = float(query.get("connect_timeout", 10))
        return Device(uri, "board", SocketChannel(host, port, uri, connect_timeout=connect), timeout)
    if scheme == "rpc":
        host, port = _host_port(parts, uri)
        return Device(uri, "rpc", RpcChannel(host, port, uri), timeout)
    if scheme == "serial":
        if not parts.path:
            raise DeviceError(f"device '{uri}' needs a serial device path: serial:///dev/ttyUSB0?baud=115200")
        baud = int(query.get("baud", 115200))
        retries, ack = int(query.get("retries", 12)), float(query.get("ack_timeout", 2.0))
        return Device(uri, "serial", SerialChannel(parts.path, baud, uri, retries=retries, ack_timeout=ack), timeout)
    if scheme == "ssh":
        return Device(uri, "ssh", ssh_channel(uri, parts, query), timeout)
    return Device(uri, "adb", adb_channel(uri, parts, query), timeout)


# -- ssh -----------------------------------------------------------------------------------------


def ssh_command(parts: Any, query: dict[str, str]) -> list[str]:
    """The ssh command line (without the remote command) for an ssh:// URI."""
    if not parts.hostname:
        raise DeviceError(f"device '{parts.geturl()}' needs a host: ssh://user@host[:port]")
    known = cache_dir() / "ssh_known_hosts"
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=accept-new"]
    argv += ["-o", f"UserKnownHostsFile={known}"]
    # A link that goes silent without closing (a dropped Wi-Fi, a board that froze) ends the
    # session after about a minute instead of hanging the host's read forever.
    argv += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if parts.port:
        argv += ["-p", str(parts.port)]
    if "identity" in query:
        argv += ["-i", query["identity"], "-o", "IdentitiesOnly=yes"]
    argv.append(f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname)
    return argv


def ssh_channel(uri: str, parts: Any, query: dict[str, str]) -> ProcessChannel:
    """Copy the runtime and agent to the host, then run the agent on ssh's pipes."""
    ssh = ssh_command(parts, query)
    folder = query.get("dir", ".edgert-agent")
    python = query.get("python", "python3")
    q = shlex.quote
    install = f"mkdir -p {q(folder)} && rm -rf {q(folder)}/edgert && tar -x -C {q(folder)}"
    try:
        proc = subprocess.run([*ssh, install], input=runtime_tar(), capture_output=True, timeout=120)
    except FileNotFoundError as exc:
        raise DeviceError(f"{uri}: the ssh client is not installed (apt-get install openssh-client)") from exc
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(f"{uri}: device unreachable (ssh did not finish within 120 s)") from exc
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        raise DeviceError(f"{uri}: cannot copy the runtime over ssh ({why[-1] if why else proc.returncode})")
    start = (
        f"cd {q(folder)} && EDGERT_HOME=. PYTHONPATH=. exec {q(python)} -m edgert.deploy.agent "
        f"--root artifacts --stdio --name {q(parts.hostname)}"
    )
    return ProcessChannel([*ssh, start], uri)


# -- adb -----------------------------------------------------------------------------------------

ADB_DIR = "/data/local/tmp/edgert"


def adb_commands(serial: str, python: str, device_port: int, local_port: int) -> dict[str, list[str]]:
    """The adb command lines that install and start the agent on phone ``serial`` and forward its port."""
    adb = ["adb", "-s", serial]
    q = shlex.quote
    start = (
        f"cd {ADB_DIR} && chmod 600 agent.secret && EDGERT_HOME=. PYTHONPATH=. nohup {q(python)} "
        f"-m edgert.deploy.agent --root artifacts --port {device_port} --name {q(serial)} "
        "--secret-file agent.secret > agent.log 2>&1 &"
    )
    return {
        "state": [*adb, "get-state"],
        "push": [*adb, "push", "{tar}", f"{ADB_DIR}.tar"],
        "unpack": [*adb, "shell", f"mkdir -p {ADB_DIR} && tar -xf {ADB_DIR}.tar -C {ADB_DIR}"],
        "secret": [*adb, "push", "{secret}", f"{ADB_DIR}/agent.secret"],
        "start": [*adb, "shell", start],
        "forward": [*adb, "forward", f"tcp:{local_port}", f"tcp:{device_port}"],
    }


def _adb(argv: list[str], uri: str, what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise DeviceError(f"{uri}: adb is not installed (apt-get install adb)") from exc
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise DeviceError(f"{uri}: {what} failed ({why[-1] if why else proc.returncode})")
    return proc.stdout.strip()


def adb_channel(uri: str, parts: Any, query: dict[str, str]) -> SocketChannel:
    """Push the runtime and agent to the phone, start the agent, forward its port, connect."""
    serial = parts.netloc
    if not serial:
        raise DeviceError(f"device '{uri}' needs a serial number: adb://SERIAL (see `adb devices`)")
    # Phones ship no Python: point ?python= at one (Termux: /data/data/com.termux/files/usr/bin/python).
    python = query.get("python", "python3")
    device_port = int(query.get("port", AGENT_PORT))
    cmds = adb_commands(serial, python, device_port, 0)
    state = subprocess.run(cmds["state"], capture_output=True, text=True, timeout=60) if _has_adb(uri) else None
    if state is None or state.returncode != 0 or state.stdout.strip() != "device":
        why = (state.stderr or state.stdout).strip().splitlines() if state else []
        raise DeviceError(
            f"{uri}: adb device '{serial}' is not connected ({why[-1] if why else 'not ready'}; see `adb devices`)"
        )
    tar = cache_dir() / "edgert-runtime.tar"
    tar.write_bytes(runtime_tar())
    _adb([a.replace("{tar}", str(tar)) for a in cmds["push"]], uri, "pushing the runtime")
    _adb(cmds["unpack"], uri, "unpacking the runtime")
    push_secret(serial, cmds["secret"], uri)
    _adb(cmds["start"], uri, "starting the agent")
    local_port = int(_adb(cmds["forward"], uri, "forwarding the agent's port") or 0)
    deadline = time.monotonic() + 60
    while True:
        try:
            return SocketChannel("127.0.0.1", local_port, uri)
        except DeviceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def push_secret(serial: str, argv: list[str], uri: str) -> None:
    """Create the phone's device secret here (printed once) and push the agent's copy (0600 there)."""
    import sys
    import tempfile
    from pathlib import Path

    from edgert.deploy.device_secrets import ensure_secret, secret_path, write_agent_copy

    secret, created = ensure_secret(f"adb-{serial}")
    if created:
        print(f"device secret for {uri}: {secret.hex()} (kept in {secret_path(f'adb-{serial}')})", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        copy = write_agent_copy(secret, Path(folder) / "agent.secret")
        _adb([a.replace("{secret}", str(copy)) for a in argv], uri, "pushing the device secret")


def _has_adb(uri: str) -> bool:
    import shutil

    if shutil.which("adb") is None:
        raise DeviceError(f"{uri}: adb is not installed (apt-get install adb)")
    return True
