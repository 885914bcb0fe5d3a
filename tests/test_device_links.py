"""The serial, ssh and adb links, each as far as it runs on this machine:

- serial: the agent on one pseudo-terminal, the host on another, and a relay between them that
  garbles bytes (line noise); frames must get through by retransmission, and a line too noisy
  to carry anything must end in a clear error with the device's artifact untouched;
- ssh: an `sshd` started on 127.0.0.1 with generated keys; the runtime and agent are copied
  over and the agent runs on ssh's pipes;
- adb: no phone here, so the commands edgert would run, and the clear error without a device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import load_tool

import edgert
from edgert.deploy import parse_device
from edgert.deploy.agent import Agent, serve_serial
from edgert.deploy.links import adb_commands
from edgert.deploy.protocol import PROTOCOL_VERSION, FdPort, SerialLink, Superseded, encode_frame
from edgert.errors import DeviceError

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def host_tokens(tiny_host_artifact: Path) -> list[int]:
    return [t.id for t in edgert.load(tiny_host_artifact).generate(PROMPT, max_tokens=8)]


# -- serial ----------------------------------------------------------------------------------------


class NoisyLine:
    """Two pseudo-terminals joined by a relay that flips bytes and injects junk at a given rate."""

    def __init__(self, error_rate: float, seed: int = 1):
        self.agent_master, agent_slave = os.openpty()
        self.host_master, host_slave = os.openpty()
        for fd in (agent_slave, host_slave):
            tty.setraw(fd)
        self.agent_slave, self.host_slave = agent_slave, host_slave
        self.host_path = os.ttyname(host_slave)
        self.rng = random.Random(seed)
        self.rate = error_rate
        self.garbled = 0
        self.stop = False
        for src, dst in ((agent_slave, self.host_master), (self.host_master, agent_slave)):
            threading.Thread(target=self._relay, args=(src, dst), daemon=True).start()

    def _relay(self, src: int, dst: int) -> None:
        port = FdPort(src)
        while not self.stop:
            data = bytearray(port.read_some(0.2))
            for i in range(len(data)):
                if self.rng.random() < self.rate:
                    data[i] ^= 1 << self.rng.randrange(8)
                    self.garbled += 1
            if data and self.rng.random() < self.rate * 200:
                data[self.rng.randrange(len(data)) :] += b"\x00\xffjunk"  # a burst of noise
                self.garbled += 1
            FdPort(dst).write(bytes(data))


@pytest.fixture
def serial_agent(tmp_path: Path) -> Iterator[tuple[Agent, NoisyLine]]:
    line = NoisyLine(error_rate=1 / 50000)
    agent = Agent(tmp_path / "uart-device", name="uart-device")
    link = SerialLink(FdPort(line.agent_master), name="agent")
    threading.Thread(target=serve_serial, args=(agent, link), daemon=True).start()
    yield agent, line
    line.stop = True


def test_serial_link_survives_line_noise(tiny_host_artifact: Path, host_tokens: list[int], serial_agent) -> None:
    agent, line = serial_agent
    with parse_device(f"serial://{line.host_path}?baud=115200") as dev:
        dev.deploy(tiny_host_artifact)
        out = dev.run(tiny_host_artifact.name, prompt=PROMPT, max_tokens=8, raw=True)
        retransmitted = dev.channel.link.retransmissions
    assert out["tokens"] == host_tokens
    assert (agent.root / tiny_host_artifact.name).read_bytes() == tiny_host_artifact.read_bytes()
    assert line.garbled > 10 and retransmitted > 0  # the noise hit, and was repaired by resending


def test_a_hopelessly_garbled_serial_line_is_named_and_the_artifact_kept(
    tiny_host_artifact: Path, host_tokens: list[int], serial_agent
) -> None:
    agent, line = serial_agent
    with parse_device(f"serial://{line.host_path}") as dev:
        dev.deploy(tiny_host_artifact)
    kept = (agent.root / tiny_host_artifact.name).read_bytes()
    line.rate = 1 / 40  # every packet garbled
    with pytest.raises(DeviceError, match=r"after 3 tries \(garbled frames on the line"):
        with parse_device(f"serial://{line.host_path}?retries=3&ack_timeout=0.5") as dev:
            dev.deploy(tiny_host_artifact)
    line.rate = 0.0
    # The agent may still be resending its answer to a request of the link given up on above: the next
    # link must read past it (a stale reply) and get the answer to its own first request.
    with parse_device(f"serial://{line.host_path}") as dev:
        out = dev.run(tiny_host_artifact.name, prompt=PROMPT, max_tokens=8, raw=True)
    assert out["tokens"] == host_tokens
    assert (agent.root / tiny_host_artifact.name).read_bytes() == kept


def test_a_stale_serial_reply_is_read_past(tmp_path: Path) -> None:
    """A reply to a request another link gave up on, waiting on the line, is never taken for the answer."""
    master, slave = os.openpty()
    tty.setraw(slave)
    agent = Agent(tmp_path / "uart-device", name="uart-device")
    agent_link = SerialLink(FdPort(master), name="agent", ack_timeout=0.5)
    with parse_device(f"serial://{os.ttyname(slave)}") as dev:

        def stale_then_serve() -> None:
            with contextlib.suppress(Superseded):  # the host asks anew instead of taking it
                agent_link.send_message(encode_frame({"ok": True, "id": 7, "device": "stale"}), reply_to=12345)
            serve_serial(agent, agent_link)

        threading.Thread(target=stale_then_serve, daemon=True).start()
        deadline = time.monotonic() + 10
        while dev.channel.port.in_waiting == 0 and time.monotonic() < deadline:  # the stale reply is on the line
            time.sleep(0.01)
        hello = dev.hello()
        assert hello["device"] == "uart-device" and hello["protocol"] == PROTOCOL_VERSION
        assert dev.channel.link.discarded == 1
        assert dev.request({"op": "list"})[0]["artifacts"] == []  # and the link goes on in step


def test_missing_serial_device_is_named() -> None:
    with pytest.raises(DeviceError, match=r"cannot open /dev/ttyNOSUCH0"):
        parse_device("serial:///dev/ttyNOSUCH0?baud=115200")


# -- ssh -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """An sshd on 127.0.0.1 (a free port) that admits root with a key generated here
    (`tools/deploy_faults.py` starts the same one for its ssh faults)."""
    proc, port, key = load_tool("deploy_faults").start_sshd(tmp_path_factory.mktemp("sshd"))
    yield port, key
    proc.terminate()
    proc.wait(timeout=10)


def test_ssh_link_copies_the_runtime_and_runs(
    tiny_host_artifact: Path, host_tokens: list[int], sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path / "cache"))
    port, key = sshd
    remote = tmp_path / "remote"
    uri = f"ssh://root@127.0.0.1:{port}?identity={key}&python={sys.executable}&dir={remote}"
    with parse_device(uri) as dev:
        hello = dev.hello()
        dev.deploy(tiny_host_artifact)
        out = dev.run(tiny_host_artifact.name, prompt=PROMPT, max_tokens=8, raw=True)
    assert out["tokens"] == host_tokens
    assert hello["runtime"] == str(remote / "edgert")  # the copied runtime ran, not this checkout
    assert (remote / "edgert" / "runtime" / "generator.py").is_file()
    assert not (remote / "edgert" / "compiler").exists() and not (remote / "edgert" / "frontend").exists()
    assert (remote / "artifacts" / tiny_host_artifact.name).read_bytes() == tiny_host_artifact.read_bytes()


def test_ssh_deploy_of_a_gpu_artifact_ships_the_opencl_runtime(
    tiny_opencl_artifact: Path, sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "device" is this machine over ssh, its OpenCL device PoCL: the library goes with the artifact,
    the agent loads the copy it received (after checking its sha256), and answers as a local run does."""
    from conftest import run_cli

    from edgert.deploy import gpu_runtime
    from edgert.runtime import opencl
    from edgert.targets import host_arch

    # The library the set-up built (the cache moves below, for ssh's known hosts); rebuilt if stale.
    monkeypatch.setenv("EDGERT_OPENCL_RUNTIME", str(opencl.library_path()))
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path / "cache"))
    library = gpu_runtime.host_library(host_arch())
    art = tiny_opencl_artifact
    want = [t.id for t in edgert.load(art).generate(PROMPT, max_tokens=6)]
    port, key = sshd
    remote = tmp_path / "remote"
    uri = f"ssh://root@127.0.0.1:{port}?identity={key}&python={sys.executable}&dir={remote}"
    shipped = remote / "artifacts" / ".opencl" / library.name
    with parse_device(uri) as dev:
        dev.deploy(art)
        out = dev.run(art.name, prompt=PROMPT, max_tokens=6, raw=True)
        info = dev.request({"op": "opencl_info", "load": True})[0]
        profile = dev.profile(art.name, runs=1, max_tokens=2, operators=False)
        with pytest.raises(DeviceError, match=r"OpenCL runtime library arrived damaged"):
            dev.request({"op": "opencl_put", "sha256": "0" * 64, "manifest": {"sha256": "0" * 64}}, b"junk")
        digest = hashlib.sha256(b"elf").hexdigest()
        with pytest.raises(DeviceError, match=rf"library sent is built for aarch64, not {host_arch()}"):
            meta = {"sha256": digest, "arch": "aarch64"}
            dev.request({"op": "opencl_put", "sha256": digest, "manifest": meta}, b"elf")
    assert out["tokens"] == want
    assert shipped.read_bytes() == library.read_bytes() and info["library"] == str(shipped)
    assert info["device"]["platform"] == "Portable Computing Language"
    assert profile["gpu"]["device"]["cpu_emulation"] and profile["gpu"]["kernels"][0]["count"] > 0

    with shipped.open("r+b") as fh:  # changed on the device: a new agent refuses to load it, in one line
        fh.seek(4096)
        byte = fh.read(1)
        fh.seek(4096)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with parse_device(uri) as dev:
        with pytest.raises(DeviceError, match=r"refusing to load .*libedgert_opencl\.so: its sha256 differs") as exc:
            dev.run(art.name, prompt=PROMPT, max_tokens=2)
        assert "\n" not in str(exc.value)
    # `edgert run --device` on the artifact the device holds: the library is sent again, then it runs.
    proc = run_cli("run", str(art), "--device", uri, "--prompt", PROMPT, "-n", "6", "--raw", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] == want and shipped.read_bytes() == library.read_bytes()

    # A device without an OpenCL driver (an empty ICD folder for its Python): named before the upload.
    empty = tmp_path / "no-icd"
    empty.mkdir()
    python = tmp_path / "python-without-opencl"
    python.write_text(f'#!/bin/sh\nOCL_ICD_VENDORS={empty} OPENCL_VENDOR_PATH={empty} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    bare = tmp_path / "bare"
    proc = run_cli(
        "deploy", str(art), "--device", f"ssh://root@127.0.0.1:{port}?identity={key}&python={python}&dir={bare}"
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no OpenCL device found" in proc.stderr and "OpenCL" in proc.stderr.strip().splitlines()[-1]
    assert not (bare / "artifacts" / art.name).exists()


def test_ssh_refused_port_is_named(sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path))
    _, key = sshd
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(DeviceError, match=rf"cannot copy the runtime over ssh \(.*port {free}: Connection refused"):
        parse_device(f"ssh://root@127.0.0.1:{free}?identity={key}")


# -- adb -------------------------------------------------------------------------------------------


def test_adb_commands_push_start_and_forward() -> None:
    cmds = adb_commands("R58M42ABCDE", "/data/data/com.termux/files/usr/bin/python", 7709, 0)
    assert cmds["state"] == ["adb", "-s", "R58M42ABCDE", "get-state"]
    assert cmds["push"][:4] == ["adb", "-s", "R58M42ABCDE", "push"]
    assert cmds["forward"] == ["adb", "-s", "R58M42ABCDE", "forward", "tcp:0", "tcp:7709"]
    start = cmds["start"][-1]
    assert "-m edgert.deploy.agent --root artifacts --port 7709" in start
    assert start.startswith("cd /data/local/tmp/edgert && ") and "/data/data/com.termux/files/usr/bin/python" in start


def test_adb_without_a_phone_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceError, match=r"adb is not installed \(apt-get install adb\)"):
        parse_device("adb://R58M42ABCDE")
    monkeypatch.undo()
    if shutil.which("adb") is None:
        pytest.fail("adb is missing: tools/setup.sh --test installs it")
    try:
        with pytest.raises(DeviceError, match=r"adb device 'R58M42ABCDE' is not connected \(.*see `adb devices`\)"):
            parse_device("adb://R58M42ABCDE")
    finally:
        subprocess.run(["adb", "kill-server"], capture_output=True, timeout=30)  # the server adb started
