"""The emulated board: an arm64 Debian root file system run under `qemu-aarch64-static`.

Built once into the user's cache (``<cache>/board``): the first stage of
``debootstrap --foreign --variant=minbase`` (which downloads the packages and unpacks the base
ones), every other downloaded package unpacked with ``dpkg -x`` (there is no binfmt here to run a
second stage), and the aarch64 wheels of numpy, apache-tvm and apache-tvm-ffi (and the runtime's
other dependencies) unzipped onto the board's ``PYTHONPATH``. The .debs and wheels are kept, so a
rebuild downloads nothing. Each start copies edgert's runtime and agent in and runs the agent
under qemu-user with the target's CPU; it serves TCP, TVM RPC and a pseudo-terminal (the board's
"UART") from one process, since a process under qemu-user cannot start another here.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgert.errors import DeviceError
from edgert.paths import build_once, cache_dir
from edgert.targets import load_target

SUITE = "bookworm"  # Python 3.11, as the wheels below
MIRROR = os.environ.get("EDGERT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgomp1")
WHEELS = (
    "numpy==2.2.6",
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",
    "ml_dtypes==0.6.0",
    "typing_extensions==4.16.0",
    "tokenizers==0.23.3",
    "jinja2==3.1.6",
    "markupsafe==3.0.4",
    "pyserial==3.5",
    "cryptography==50.0.2",  # verifies artifact signatures (abi3 wheel, OpenSSL inside)
    "cffi==2.1.1",
    "pycparser==3.12",
)
WHEEL_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
PYTHON = "usr/bin/python3.11"
SITE = "opt/edgert/site"
SRC = "opt/edgert/src"
AGENT_ROOT = "var/lib/edgert-agent"
START_TIMEOUT = 120.0

Progress = Callable[[str, float | None], None]


class BoardError(DeviceError):
    """The emulated board cannot be built, started or reached."""


def board_dir() -> Path:
    """Where the board lives: ``<cache>/board``."""
    path = cache_dir() / "board"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _recipe() -> dict[str, Any]:
    return {"suite": SUITE, "packages": list(PACKAGES), "wheels": list(WHEELS)}


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool) or (shutil.which(tool, path="/usr/sbin:/sbin"))
    if path is None:
        raise BoardError(f"the emulated board needs '{tool}': apt-get install {package}")
    return path


def rootfs_path() -> Path:
    """The board's root file system (built by `build_rootfs`)."""
    return board_dir() / "rootfs-arm64"


ROOTFS_STAMP = ".edgert-rootfs.json"


def build_rootfs(progress: Progress | None = None) -> Path:
    """Build the arm64 root file system once; later calls return the cached one at once.

    Built under a lock into a temporary folder and renamed into place with its stamp
    (`edgert.paths.build_once`): two first starts at once build it once, and a half-built one
    (a killed build) is rebuilt.
    """
    return build_once(rootfs_path(), lambda part: _build_rootfs(part, progress), ROOTFS_STAMP, json.dumps(_recipe()))


def _build_rootfs(part: Path, progress: Progress | None) -> None:
    """Debootstrap, unpack and add the wheels into the empty folder ``part``."""
    say = progress or (lambda stage, fraction: None)
    debootstrap = _need("debootstrap", "debootstrap")
    _need("qemu-aarch64-static", "qemu-user-static")
    if os.geteuid() != 0:
        raise BoardError("building the board's root file system needs root (debootstrap creates device files)")
    debs, wheels = board_dir() / "debs", board_dir() / "wheels"
    debs.mkdir(exist_ok=True)
    wheels.mkdir(exist_ok=True)

    say("debootstrap (first stage): downloading arm64 packages", None)
    argv = [debootstrap, "--arch=arm64", "--foreign", "--variant=minbase", f"--cache-dir={debs}"]
    argv += [f"--include={','.join(PACKAGES)}", SUITE, str(part), MIRROR]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-20:], line.rstrip()]
        if line.startswith("I: "):
            say(f"debootstrap: {line[3:].strip()}", None)
    if proc.wait() != 0:
        raise BoardError(f"debootstrap failed (exit {proc.returncode}): {' | '.join(tail[-3:])}")

    packages = sorted((part / "var/cache/apt/archives").glob("*.deb"))
    for i, deb in enumerate(packages):  # the first stage unpacked only the base packages
        say(f"dpkg -x {deb.name.split('_')[0]}", i / len(packages))
        subprocess.run(["dpkg", "-x", str(deb), str(part)], check=True, capture_output=True)
        deb.unlink()  # a copy stays in the cache folder
    # Device files made by debootstrap belong to no devpts instance here; without them qemu-user
    # falls back to the host's /dev (a new pty, /dev/null, /dev/urandom).
    shutil.rmtree(part / "dev")
    (part / "dev").mkdir()

    say("pip download: aarch64 wheels", None)
    download_wheels(wheels)
    site = part / SITE
    site.mkdir(parents=True)
    names = sorted(wheels.glob("*.whl"))
    for i, wheel in enumerate(names):
        say(f"unzip {wheel.name.split('-')[0]}", i / len(names))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    say("root file system ready", 1.0)


def download_wheels(folder: Path) -> None:
    """The aarch64 (manylinux) wheels of the runtime's dependencies, into ``folder`` (kept as a cache)."""
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps"]
    argv += ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "-d", str(folder)]
    for plat in WHEEL_PLATFORMS:
        argv += ["--platform", plat]
    proc = subprocess.run([*argv, *WHEELS], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise BoardError(f"downloading the aarch64 wheels failed: {lines[-1] if lines else proc.returncode}")
    pins = dict(w.lower().replace("-", "_").split("==") for w in WHEELS)
    for wheel in folder.glob("*.whl"):  # drop versions that a changed pin left behind
        name, version = wheel.name.split("-")[:2]
        if pins.get(name.lower(), version) != version:
            wheel.unlink()


def install_runtime(rootfs: Path) -> None:
    """Copy edgert's runtime and agent (fresh, every start) into the board."""
    from edgert.deploy.bundle import runtime_tar

    src = rootfs / SRC
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(runtime_tar())) as tar:
        tar.extractall(src, filter="data")
    precompile(src)


PYC_STAMP = ".edgert-pyc"


def precompile(folder: Path, guest_path: str | None = None) -> bool:
    """Byte-compile ``folder``'s Python files with this (host) Python, when it is the board's 3.11.

    Python under qemu-user compiles a module many times slower than the host does, and Debian
    compiles the standard library in a package script that the unpacked (never configured) root
    file system never ran: without this the board's first start spends most of its time compiling.
    A .pyc holds no machine code, so the host's serves the board. ``guest_path``: the folder as the
    board sees it (for tracebacks).
    """
    if sys.version_info[:2] != (3, 11):  # another bytecode version: the board compiles its own
        return False
    import compileall

    compileall.compile_dir(str(folder), ddir=guest_path, quiet=2, workers=0)
    return True


def precompile_rootfs(rootfs: Path) -> None:
    """Byte-compile the board's standard library and wheels once (a stamp records it)."""
    stamp = rootfs / PYC_STAMP
    if stamp.is_file():
        return
    done = precompile(rootfs / "usr/lib/python3.11", "/usr/lib/python3.11") and precompile(rootfs / SITE)
    if done:
        stamp.write_text(sys.version)


def _state_file() -> Path:
    return board_dir() / "state.json"


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"edgert.deploy.agent" in cmdline and b"--emulated" in cmdline


def status() -> dict[str, Any] | None:
    """The running board's state (pid, target, ports, serial device), or None when none runs."""
    path = _state_file()
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if not _alive(int(state["pid"])):
        path.unlink(missing_ok=True)
        return None
    return state


def running_board() -> dict[str, Any]:
    """The running board's state, or a BoardError saying how to start one."""
    state = status()
    if state is None:
        raise BoardError("no emulated board is running: start one with `edgert board start`")
    return state


def start(target: str = "rpi5", port: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Build (once) and start the emulated board for ``target``; its state. Agent bound to 127.0.0.1.

    Serialised by a lock: a second start at the same time waits, then finds this board running.
    The board's agent requires the device secret "board" (created on the first start, when the
    state's ``secret_created`` holds it, to be printed once).
    """
    import fcntl

    with open(board_dir() / ".start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _start(target, port, progress)


def _start(target: str, port: int, progress: Progress | None) -> dict[str, Any]:
    spec = load_target(target)
    if spec.arch != "aarch64":
        raise BoardError(f"the emulated board is arm64; target '{target}' is {spec.arch}")
    if spec.kind == "gpu":
        raise BoardError(
            f"the emulated board has no GPU (qemu emulates the CPU only); target '{target}' runs kernels on "
            "OpenCL: start it with a CPU target such as rpi5"
        )
    running = status()
    if running is not None:
        if running["target"] == target and port in (0, running["port"]):
            return running
        raise BoardError(f"an emulated {running['target']} board is already running: `edgert board stop` first")
    rootfs = build_rootfs(progress)
    say = progress or (lambda stage, fraction: None)
    say("byte-compiling the board's Python (first start only)", None)
    precompile_rootfs(rootfs)
    say("starting the agent under qemu-aarch64-static", None)
    install_runtime(rootfs)
    folder = board_dir()
    pty_file, log = folder / "serial-pty", folder / "agent.log"
    pty_file.unlink(missing_ok=True)
    from edgert.deploy.device_secrets import ensure_secret, write_agent_copy

    secret, created = ensure_secret("board")
    secret_file = write_agent_copy(secret, folder / "agent.secret")
    qemu = _need("qemu-aarch64-static", "qemu-user-static")
    threads = max(1, min(spec.default_threads(), os.cpu_count() or 1))  # emulated cores share the host's
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": f"{rootfs / SRC}:{rootfs / SITE}",
        "EDGERT_HOME": str(rootfs / SRC),
        "EDGERT_CACHE": str(rootfs / "var/cache/edgert"),
        "HOME": str(rootfs / "root"),
        "TVM_USE_RUNTIME_LIB": "1",
        "TVM_NUM_THREADS": str(threads),
    }
    name = f"emulated {target} ({spec.cpu}, qemu-aarch64)"
    argv = [qemu, "-L", str(rootfs), "-cpu", spec.cpu, str(rootfs / PYTHON), "-m", "edgert.deploy.agent"]
    argv += ["--root", str(rootfs / AGENT_ROOT), "--host", "127.0.0.1", "--port", str(port), "--rpc-port", "0"]
    argv += ["--serial-pty", str(pty_file), "--name", name, "--emulated", "--secret-file", str(secret_file)]
    with log.open("wb") as fh:
        # cwd: `python -m` puts it first on sys.path; it must be the board's copy of edgert
        proc = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=rootfs / SRC, start_new_session=True
        )
    deadline = time.monotonic() + START_TIMEOUT
    text = ""
    while "edgert-agent ready" not in text:
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            lines = log.read_text(errors="replace").strip().splitlines()
            raise BoardError(f"the board's agent did not start: {lines[-1] if lines else 'no output'} (see {log})")
        time.sleep(0.25)
        text = log.read_text(errors="replace")
    tcp = re.search(r"listening on ([\d.]+):(\d+)", text)
    rpc = re.search(r"rpc on ([\d.]+):(\d+)", text)
    serial = re.search(r"serial on (\S+)", text)
    assert tcp and rpc and serial, text
    state = {
        "pid": proc.pid,
        "target": target,
        "cpu": spec.cpu,
        "name": name,
        "port": int(tcp.group(2)),
        "rpc_port": int(rpc.group(2)),
        "serial": serial.group(1),
        "uris": {
            "board": f"board://127.0.0.1:{tcp.group(2)}",
            "rpc": f"rpc://127.0.0.1:{rpc.group(2)}",
            "serial": f"serial://{serial.group(1)}?baud=115200",
        },
        "rootfs": str(rootfs),
        "log": str(log),
        "started": time.time(),
    }
    _state_file().write_text(json.dumps(state, indent=1))
    return {**state, "secret_created": secret.hex()} if created else state


def stop() -> bool:
    """Stop the running board (the agent process this module started); False if none ran."""
    state = status()
    if state is None:
        return False
    terminate(int(state["pid"]))
    _state_file().unlink(missing_ok=True)
    return True


def terminate(pid: int) -> None:
    """Stop a board's agent process: SIGTERM, then SIGKILL if it is still there after 10 s."""
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
