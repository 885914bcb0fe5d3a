"""The device agent and its wire protocol over TCP (the link board:// and adb:// use), with faults:
refused port, unreachable host, link cut mid-upload, too little disk, an artifact for another
target, a garbled frame, and paths outside the agent's folder. The device must keep the
artifact it had through every one of them."""

from __future__ import annotations

import socket
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from test_runtime_only import (
    FORBIDDEN_EDGERT,
    FORBIDDEN_TVM,
    ROOT,
    _forbidden,
    _imports,
    _module_file,
    device_side_files,
)

import edgert
from edgert.deploy import parse_device
from edgert.deploy.agent import Agent, tcp_server
from edgert.deploy.protocol import FrameError, decode_frame, encode_frame, read_frame, socket_reader
from edgert.errors import DeviceError, TargetError

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


def serve(agent: Agent) -> tuple[int, object]:
    server = tcp_server(agent, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], server


@pytest.fixture
def agent_port(tmp_path: Path) -> Iterator[tuple[Agent, int]]:
    agent = Agent(tmp_path / "device", name="test-device")
    port, server = serve(agent)
    yield agent, port
    server.shutdown()  # type: ignore[attr-defined]
    server.server_close()  # type: ignore[attr-defined]


def host_tokens(artifact: Path, n: int = 8) -> list[int]:
    model = edgert.load(artifact)
    return [t.id for t in model.generate(PROMPT, max_tokens=n)]


def test_frames_round_trip_and_refuse_garbling() -> None:
    frame = encode_frame({"op": "hello", "x": [1, 2]}, b"\x00payload\xff")
    assert decode_frame(frame) == ({"op": "hello", "x": [1, 2]}, b"\x00payload\xff")
    for pos in (0, 14, len(frame) // 2, len(frame) - 1):
        bad = bytearray(frame)
        bad[pos] ^= 0x20
        with pytest.raises(FrameError, match="garbled frame"):
            decode_frame(bytes(bad))
    with pytest.raises(FrameError, match="truncated"):
        decode_frame(frame[:-3])


def test_family_ops_are_served_by_the_models_own_family() -> None:
    """`run` is served by llama and gemma3 alike: the agent binds it to the artifact's family."""
    from edgert.families import registry

    assert registry.families_serving("run") == ["llama", "gemma3"]
    for name in ("llama", "gemma3"):
        family, function = registry.device_op("run", name)
        assert family.name == name and callable(function)
    assert registry.device_op("run", "whisper") is None and registry.device_op("transcribe", "whisper") is not None


def test_agent_imports_nothing_from_the_compiler_side() -> None:
    # The agent, and what it reaches through the registry (each family's runtime task and device ops).
    todo, seen, bad = [ROOT / "edgert" / "deploy" / "agent.py", *device_side_files()], set(), []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            if _forbidden(name, FORBIDDEN_EDGERT + FORBIDDEN_TVM) or name.split(".")[0] == "matplotlib":
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif name.startswith("edgert.") and (dep := _module_file(name)) is not None:
                todo.append(dep)
    assert bad == []
    assert ROOT / "edgert" / "profile" / "measure.py" in seen and ROOT / "edgert" / "runtime" / "generator.py" in seen


def test_deploy_and_run_over_tcp_gives_the_host_tokens(tiny_host_artifact: Path, agent_port, tmp_path: Path) -> None:
    agent, port = agent_port
    seen: list[tuple[int, int]] = []
    with parse_device(f"board://127.0.0.1:{port}") as dev:
        assert dev.hello()["device"] == "test-device" and dev.hello()["artifacts"] == []
        reply = dev.deploy(tiny_host_artifact, progress=lambda done, total: seen.append((done, total)))
        assert reply["size"] == tiny_host_artifact.stat().st_size
        assert seen[-1] == (reply["size"], reply["size"])
        out = dev.run(tiny_host_artifact.name, prompt=PROMPT, max_tokens=8, raw=True)
        assert [a["name"] for a in dev.request({"op": "list"})[0]["artifacts"]] == [tiny_host_artifact.name]
    assert out["tokens"] == host_tokens(tiny_host_artifact)
    assert out["stats"]["generated_tokens"] == 8
    assert (agent.root / tiny_host_artifact.name).read_bytes() == tiny_host_artifact.read_bytes()
    assert not list(agent.root.glob(".*.part"))


def test_refused_port_and_unreachable_host_are_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(DeviceError, match=rf"connection refused on 127.0.0.1:{free}"):
        parse_device(f"board://127.0.0.1:{free}")
    with pytest.raises(DeviceError, match=r"device unreachable \(.*not known"):  # .invalid never resolves
        parse_device("board://raspberrypi.invalid:7709?connect_timeout=2")
    with pytest.raises(DeviceError, match="device link 'nosuch' is not available"):
        parse_device("nosuch://x")


def _upload(dev, artifact: Path) -> None:
    """put_begin/put_chunk/put_end by hand, skipping the host's own target check."""
    import hashlib

    data = artifact.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    begin = dev.request({"op": "put_begin", "name": artifact.name, "size": len(data), "sha256": digest})
    for off in range(0, len(data), 1 << 20):
        dev.request({"op": "put_chunk", "upload": begin[0]["upload"], "offset": off}, data[off : off + (1 << 20)])
    dev.request({"op": "put_end", "upload": begin[0]["upload"]})


def test_artifact_for_another_target_is_refused_and_the_old_one_kept(
    tiny_host_artifact: Path, tiny_rpi5_artifact: Path, agent_port, tmp_path: Path
) -> None:
    agent, port = agent_port
    renamed = tmp_path / tiny_host_artifact.name
    renamed.write_bytes(tiny_rpi5_artifact.read_bytes())  # same name, aarch64 inside
    with parse_device(f"board://127.0.0.1:{port}") as dev:
        dev.deploy(tiny_host_artifact)
        with pytest.raises(TargetError, match=r"compiled for target 'rpi5' \(aarch64, cortex-a76\).*is x86_64"):
            dev.deploy(renamed)
        with pytest.raises(TargetError, match="this machine is x86_64"):  # the agent checks too
            _upload(dev, renamed)
        assert dev.run(renamed.name, prompt=PROMPT, max_tokens=8, raw=True)["tokens"] == host_tokens(tiny_host_artifact)
    assert not list(agent.root.glob(".*.part"))


def test_too_little_disk_is_refused_before_uploading(tiny_host_artifact: Path, tmp_path: Path) -> None:
    size = tiny_host_artifact.stat().st_size
    agent = Agent(tmp_path / "small", quota_bytes=size + size // 2)
    port, server = serve(agent)
    with parse_device(f"board://127.0.0.1:{port}") as dev:
        dev.deploy(tiny_host_artifact)
        with pytest.raises(DeviceError, match=r"too little free disk space .*needs [0-9.]+ MB, [0-9.]+ MB are free"):
            dev.deploy(tiny_host_artifact)
        assert dev.run(tiny_host_artifact.name, prompt=PROMPT, max_tokens=4, raw=True)["tokens"]
    server.shutdown()
    name = tiny_host_artifact.name
    assert sorted(p.name for p in agent.root.iterdir()) == [f".{name}.sha256", name]  # its verified digest


def test_paths_outside_the_agent_folder_are_refused(agent_port, tmp_path: Path) -> None:
    _, port = agent_port
    (tmp_path / "secret.txt").write_text("no")
    with parse_device(f"board://127.0.0.1:{port}") as dev:
        for path in ("../secret.txt", str(tmp_path / "secret.txt"), "results/../../secret.txt"):
            with pytest.raises(DeviceError, match=r"outside the agent's folder"):
                dev.fetch(path)
        with pytest.raises(DeviceError, match=r"path '\.\./x\.edgert' is outside the agent's folder"):
            dev.request({"op": "put_begin", "name": "../x.edgert", "size": 1, "sha256": "0"})
        with pytest.raises(DeviceError, match="outside the agent's folder"):
            dev.run("../secret.txt", prompt="x")
    assert not (tmp_path / "x.edgert").exists()


def test_a_garbled_frame_gets_a_clear_refusal(agent_port) -> None:
    _, port = agent_port
    frame = bytearray(encode_frame({"op": "hello"}))
    frame[-1] ^= 1
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(bytes(frame))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    reply, _ = decode_frame(data)
    assert reply == {"ok": False, "error": "garbled frame: CRC mismatch", "kind": "FrameError"}


def test_a_link_cut_mid_upload_keeps_the_previous_artifact(tiny_host_artifact: Path, agent_port) -> None:
    agent, port = agent_port
    with parse_device(f"board://127.0.0.1:{port}") as dev:
        dev.deploy(tiny_host_artifact)
    before = (agent.root / tiny_host_artifact.name).stat().st_mtime_ns

    # A relay that forwards the first 3 MB towards the device, then cuts both sides.
    relay = socket.create_server(("127.0.0.1", 0))

    def cut_after(limit: int) -> None:
        client, _ = relay.accept()
        upstream = socket.create_connection(("127.0.0.1", port))
        threading.Thread(target=lambda: _pump(upstream, client), daemon=True).start()
        sent = 0
        while sent < limit and (block := client.recv(65536)):
            upstream.sendall(block)
            sent += len(block)
        for sock in (client, upstream):  # shutdown: another thread is blocked in recv on them
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    threading.Thread(target=cut_after, args=(3 << 20,), daemon=True).start()
    with pytest.raises(DeviceError, match=r"the link was cut"):
        with parse_device(f"board://127.0.0.1:{relay.getsockname()[1]}") as dev:
            dev.deploy(tiny_host_artifact)
    with parse_device(f"board://127.0.0.1:{port}") as dev:
        out = dev.run(tiny_host_artifact.name, prompt=PROMPT, max_tokens=8, raw=True)
        assert out["tokens"] == host_tokens(tiny_host_artifact)
    assert (agent.root / tiny_host_artifact.name).stat().st_mtime_ns == before
    for _ in range(50):  # the agent drops the partial file when it notices the cut
        if not list(agent.root.glob(".*.part")):
            break
        threading.Event().wait(0.1)
    assert not list(agent.root.glob(".*.part"))
    kept = (agent.root / tiny_host_artifact.name).read_bytes()
    assert zlib.crc32(kept) == zlib.crc32(tiny_host_artifact.read_bytes())


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while block := src.recv(65536):
            dst.sendall(block)
    except OSError:
        pass


def test_deploy_command_reports_the_verified_upload(tiny_host_artifact: Path, agent_port) -> None:
    agent, port = agent_port
    res = run_cli("deploy", str(tiny_host_artifact), "--device", f"board://127.0.0.1:{port}")
    assert res.returncode == 0, res.stderr
    size_mb = tiny_host_artifact.stat().st_size / 1e6
    text = " ".join(res.stderr.split())
    assert f"deployed {tiny_host_artifact.name} to test-device (board://127.0.0.1:{port}): {size_mb:.1f} MB" in text
    assert "verified" in text
    assert (agent.root / tiny_host_artifact.name).read_bytes() == tiny_host_artifact.read_bytes()
    res = run_cli("deploy", str(tiny_host_artifact), "--device", "board://127.0.0.1:1")
    assert res.returncode == 2 and "connection refused on 127.0.0.1:1" in res.stderr and "Traceback" not in res.stderr


def test_stale_and_duplicate_replies_are_read_past(agent_port) -> None:
    """A relay that delivers every reply twice: each request must still get its own answer."""
    _, port = agent_port
    relay = socket.create_server(("127.0.0.1", 0))

    def twice() -> None:
        client, _ = relay.accept()
        upstream = socket.create_connection(("127.0.0.1", port))
        from_client, from_agent = socket_reader(client, "client"), socket_reader(upstream, "agent")
        with client, upstream:
            while True:
                try:
                    upstream.sendall(encode_frame(*read_frame(from_client)))
                except DeviceError:
                    return
                reply = encode_frame(*read_frame(from_agent))
                client.sendall(reply + reply)

    threading.Thread(target=twice, daemon=True).start()
    with parse_device(f"board://127.0.0.1:{relay.getsockname()[1]}") as dev:
        assert dev.hello()["device"] == "test-device"
        listed = dev.request({"op": "list"})[0]
        assert listed["artifacts"] == [] and "device" not in listed  # list's reply, not hello's delivered again
        with pytest.raises(DeviceError, match=r"no file 'nothing\.json'"):
            dev.fetch("nothing.json")
        assert "device" not in dev.request({"op": "list"})[0]
        assert dev.channel.discarded == 3
    relay.close()


def test_an_unsigned_artifact_runs_only_with_allow_unsigned(tiny_host_artifact: Path, tmp_path: Path) -> None:
    import zipfile

    folder = tmp_path / "unsigned.edgert"
    with zipfile.ZipFile(tiny_host_artifact) as zf:
        zf.extractall(folder, [n for n in zf.namelist() if n != "manifest.sig"])
    args = ("run", str(folder), "--prompt", PROMPT, "--max-tokens", "2", "--raw")
    res = run_cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "is unsigned: its native code is not loaded (pass --allow-unsigned" in " ".join(res.stderr.split())
    from edgert.artifact import signing

    signing.allow_unsigned(True)  # what --allow-unsigned sets
    try:
        tokens = [t.id for t in edgert.load(folder).generate(PROMPT, max_tokens=8)]
    finally:
        signing.allow_unsigned(False)
    assert tokens == host_tokens(tiny_host_artifact)
