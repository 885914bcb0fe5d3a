"""Issue 21, part A: the agent only its owner can use, signed artifacts, safe caches, faults on links.

Every attack named in the issue is tried against a real agent on 127.0.0.1 (in this process):
unauthenticated connections, a wrong secret, an upload named like the agent's hidden digest file,
idle sockets, 500 put_begin on one connection, a negative fetch length, too many connections, and
an arbitrary shared library with consistent hashes but no valid signature (its constructor must
never run). The Ed25519 verifier the devices use without `cryptography` is checked against it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import load_tool, run_cli

from edgert.artifact import signing
from edgert.artifact.reader import open_artifact
from edgert.artifact.writer import write_artifact
from edgert.deploy import parse_device
from edgert.deploy.agent import MAX_UPLOADS_PER_CONNECTION, Agent, tcp_server
from edgert.deploy.protocol import AuthError, decode_frame, encode_frame, new_secret, read_frame, socket_reader
from edgert.errors import ArtifactError, DeviceError, EdgertError
from edgert.paths import build_once
from edgert.targets import host_arch


@pytest.fixture(autouse=True)
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh config folder (keys, device secrets) and cache for each test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGERT_DEVICE_SECRET", raising=False)
    signing.allow_unsigned(False)
    yield tmp_path / "config" / "edgert"
    signing.allow_unsigned(False)


EVIL_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void pwn(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("constructor ran", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A shared library whose constructor writes a marker file: (library, marker)."""
    folder = tmp_path_factory.mktemp("evil")
    marker = folder / "marker.txt"
    (folder / "evil.c").write_text(EVIL_C)
    lib = folder / "model.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(folder / "evil.c")], check=True
    )
    return lib, marker


def small_artifact(folder: Path, library: Path | None = None, sign: bool = True, name: str = "demo.edgert") -> Path:
    """A small artifact for this machine: its ``model.so`` is ``library`` (or random bytes)."""
    stage = folder / f"stage-{name}"
    stage.mkdir(parents=True, exist_ok=True)
    so = stage / "model.so"
    so.write_bytes(library.read_bytes() if library else random.Random(name).randbytes(4096))
    out = folder / name
    target = {"name": "host", "arch": host_arch(), "triple": "", "cpu": "", "cpu_flags": []}
    manifest = {"name": "demo", "family": "llama", "created_by": "test", "tvm_version": "-", "target": target}
    manifest.update(library="model.so", entry_points={})
    write_artifact(out, manifest, {"model.so": so}, sign=sign)
    return out


# -- signatures ----------------------------------------------------------------------------------


def test_artifacts_are_signed_and_every_tampering_is_named(
    tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    art = small_artifact(tmp_path)
    assert (config / signing.PRIVATE_KEY).stat().st_mode & 0o777 == 0o600  # made on first write
    status = open_artifact(art).signature()
    assert status.trusted and status.key == signing.fingerprint(signing.own_public_key() or b"")
    assert open_artifact(small_artifact(tmp_path, sign=False, name="u.edgert")).signature().state == "unsigned"

    # A valid signature by a key this machine does not trust, until `edgert keys trust`.
    other = tmp_path / "other-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(other))  # someone else's machine
    small_artifact(tmp_path, name="theirs.edgert")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config.parent))
    theirs = open_artifact(tmp_path / "theirs.edgert")
    assert theirs.signature().state == "untrusted"
    with pytest.raises(ArtifactError, match=r"does not trust.*--allow-unsigned"):
        theirs.library_file()
    signing.trust(signing.parse_public_key((other / "edgert" / signing.PUBLIC_KEY).read_text()))  # `edgert keys trust`
    assert open_artifact(tmp_path / "theirs.edgert").signature().trusted

    # The manifest changed and re-hashed (a swapped model.so with consistent hashes): the signature breaks.
    folder = tmp_path / "folder.edgert"
    folder.mkdir()
    with zipfile.ZipFile(art) as zf:
        zf.extractall(folder)
    (folder / "model.so").write_bytes(b"\x7fELF not the compiled library")
    manifest = json.loads((folder / "manifest.json").read_bytes())
    manifest["files"]["model.so"] = {"sha256": hashlib.sha256(b"\x7fELF not the compiled library").hexdigest(),
                                     "size": 29}  # fmt: skip
    body = json.dumps(manifest).encode()
    (folder / "manifest.json").write_bytes(body)
    (folder / "manifest.sha256").write_text(hashlib.sha256(body).hexdigest())
    forged = open_artifact(folder)  # every hash is consistent...
    assert forged.signature().state == "invalid"  # ...but not the signature
    with pytest.raises(ArtifactError, match="invalid signature"):
        forged.library_file()
    res = run_cli("inspect", str(folder))
    assert res.returncode == 0 and "signature: invalid signature" in " ".join(res.stdout.split())
    res = run_cli("inspect", str(art))
    assert "signed by" in res.stdout and "(trusted)" in res.stdout


def test_an_unsigned_library_never_runs_its_constructor(tmp_path: Path, evil_library: tuple[Path, Path]) -> None:
    lib, marker = evil_library
    marker.unlink(missing_ok=True)
    art = small_artifact(tmp_path, lib, sign=False, name="evil.edgert")
    agent = Agent(tmp_path / "device", name="victim")
    data = art.read_bytes()
    begin, _ = agent.handle(
        {"op": "put_begin", "name": art.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    )
    agent.handle({"op": "put_chunk", "upload": begin["upload"], "offset": 0}, data)
    reply, _ = agent.handle({"op": "put_end", "upload": begin["upload"]})
    assert not reply["ok"] and "unsigned" in reply["error"] and reply["kind"] == "SignatureError"
    assert not (agent.root / art.name).exists()
    (agent.root / art.name).write_bytes(data)  # placed on the device by other means: run still refuses it
    reply, _ = agent.handle({"op": "run", "name": art.name, "prompt": "hi"})
    assert not reply["ok"] and "unsigned" in reply["error"]
    with pytest.raises(ArtifactError, match=r"unsigned.*--allow-unsigned"):
        open_artifact(art).library_file()
    assert not marker.exists()
    signing.allow_unsigned(True)  # the control: with the explicit flag the same library loads, and runs its code
    ctypes.CDLL(str(open_artifact(art).library_file()))
    assert marker.read_text() == "constructor ran"


def test_a_swapped_cached_library_is_rebuilt_from_the_artifact(tmp_path: Path) -> None:
    art = open_artifact(small_artifact(tmp_path))
    cached = art.library_file()
    original = cached.read_bytes()
    assert original == art.read_bytes("model.so")
    cached.write_bytes(b"\x7fELF someone else's library")  # same name in the cache
    assert art.library_file() == cached and cached.read_bytes() == original


def test_keys_cli_generates_once_and_lists(config: Path) -> None:
    first = run_cli("keys", "generate")
    assert first.returncode == 0 and "created" in first.stderr
    public = first.stdout.strip()
    assert signing.ensure_key()[1] is False and signing.own_public_key().hex() == public  # type: ignore[union-attr]
    assert f"{public}  yours" in run_cli("keys", "list").stdout
    with pytest.raises(EdgertError, match="not an Ed25519 public key"):
        signing.parse_public_key("zz")


def test_two_processes_creating_the_key_at_once_agree(config: Path) -> None:
    code = "from edgert.artifact.signing import ensure_key, own_public_key; ensure_key(); print(own_public_key().hex())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(keys) == 1 and len(next(iter(keys))) == 64
    assert keys == {signing.own_public_key().hex()}  # type: ignore[union-attr]


def _cli_command(path: str):  # type: ignore[no-untyped-def]
    import typer

    from edgert.cli import app

    cmd = typer.main.get_command(app)
    for part in path.split():
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    return cmd


def test_every_command_that_loads_an_artifact_takes_allow_unsigned() -> None:
    """The one shared option applies itself while the arguments are parsed, before anything loads;
    and a command taking an artifact is either in the list or known not to load native code here."""
    from edgert.cli.common import LOADING_COMMANDS

    for path in LOADING_COMMANDS:
        cmd = _cli_command(path)
        required = []
        for p in cmd.params:
            if p.required:
                required += ["x"] if p.param_type_name == "argument" else [p.opts[0], "x"]
        for flag, allowed in (([], False), (["--allow-unsigned"], True)):
            signing.allow_unsigned(False)
            cmd.make_context(path, [*required, *flag])
            assert signing.unsigned_allowed() is allowed, (path, flag)
    # inspect only hashes; deploy uploads (the device's agent decides); compile writes; keys, farm, board: no artifact
    not_loading = {"compile", "inspect", "deploy"}
    takes_artifact = {
        name
        for name, cmd in _cli_command("").commands.items()
        if any(p.name in ("artifact", "artifacts") for p in getattr(cmd, "params", []))
    }
    takes_artifact |= {f"codec {n}" for n in _cli_command("codec").commands}
    assert takes_artifact - not_loading == set(LOADING_COMMANDS), takes_artifact ^ set(LOADING_COMMANDS)


def test_allow_unsigned_on_bench_end_to_end(tiny_host_artifact: Path, tmp_path: Path) -> None:
    folder = tmp_path / "unsigned.edgert"
    with zipfile.ZipFile(tiny_host_artifact) as zf:
        zf.extractall(folder, [n for n in zf.namelist() if n != "manifest.sig"])
    args = ("bench", str(folder), "--repeats", "1", "--prompt-tokens", "4", "--gen-tokens", "2", "--json")
    res = run_cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "is unsigned: its native code is not loaded" in " ".join(res.stderr.split())
    res = run_cli(*args, "--allow-unsigned")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["decode_tokens_per_second"] > 0


# -- caches built once -----------------------------------------------------------------------------

BUILD = """
import sys, time
from pathlib import Path
from edgert.paths import build_once
def build(part):
    (part / "a").write_text("x")
    time.sleep(0.3)  # both processes are inside build_once at once
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
build_once(Path(sys.argv[1]), build, content="v1")
print((Path(sys.argv[1]) / "a").read_text())
"""


def test_build_once_between_processes_and_after_a_half_build(tmp_path: Path) -> None:
    dest, log = tmp_path / "cache" / "rootfs", tmp_path / "log"
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD, str(dest), str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    assert [p.communicate(timeout=60)[0].strip() for p in procs] == ["x", "x"]  # both succeed
    assert log.read_text() == "built\n"  # built once
    assert sorted(p.name for p in dest.parent.iterdir()) == [".rootfs.lock", "rootfs"]  # no temporary left

    def fail(part: Path) -> None:
        (part / "half").write_text("")
        raise OSError("disk full")

    other = tmp_path / "cache" / "other"
    with pytest.raises(OSError, match="disk full"):
        build_once(other, fail)
    assert not other.exists()
    other.mkdir()  # a half-built folder from an older edgert (no stamp): rebuilt
    (other / "junk").write_text("")
    build_once(other, lambda part: (part / "ok").write_text(""))
    assert sorted(p.name for p in other.iterdir()) == [".edgert-complete", "ok"]


@pytest.mark.slow
def test_the_real_board_rootfs_path_is_found_complete_without_a_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgert.deploy import board

    monkeypatch.delenv("EDGERT_CACHE")
    # Built here when no board test has built it yet (parallel workers, empty cache); a build running
    # in another process is waited for.
    rootfs = board.build_rootfs()
    assert rootfs == board.rootfs_path() and (rootfs / board.ROOTFS_STAMP).is_file()
    before = (rootfs / board.ROOTFS_STAMP).stat().st_mtime_ns
    monkeypatch.setattr(board, "_build_rootfs", lambda *a: pytest.fail("rebuilt a complete rootfs"))
    assert board.build_rootfs() == rootfs
    assert (rootfs / board.ROOTFS_STAMP).stat().st_mtime_ns == before


# -- the agent -------------------------------------------------------------------------------------


@pytest.fixture
def secure_agent(tmp_path: Path) -> Iterator[tuple[Agent, int, bytes]]:
    secret = new_secret()
    agent = Agent(tmp_path / "device", name="secure", secret=secret)
    server = tcp_server(agent, "127.0.0.1", 0, idle_timeout=0.5, max_connections=40)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield agent, server.server_address[1], secret
    server.shutdown()
    server.server_close()


def raw_exchange(port: int, *frames: dict) -> list[dict]:
    """Send ``frames`` on one connection; every reply until the agent closes it."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        read = socket_reader(s, "test")
        for frame in frames:
            try:
                s.sendall(encode_frame(frame))
                replies.append(read_frame(read)[0])
            except (DeviceError, OSError):
                break
        s.settimeout(2)
        assert s.recv(1) == b""  # then closed
    return replies


def test_unauthenticated_and_wrong_secret_connections_are_refused(
    secure_agent: tuple[Agent, int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, port, secret = secure_agent
    (agent.root / "x.edgert").write_bytes(b"x")
    for op in ({"op": "hello"}, {"op": "list"}, {"op": "fetch", "path": "x.edgert"}):
        replies = raw_exchange(port, op, {"op": "hello"})
        assert len(replies) == 1 and not replies[0]["ok"] and "not authenticated" in replies[0]["error"]
    with pytest.raises(AuthError, match="could not prove it holds this device's secret"):
        dev = parse_device(f"board://127.0.0.1:{port}")
        dev.authenticate(new_secret())  # a host with another secret: the agent's proof fails first
    monkeypatch.setenv("EDGERT_DEVICE_SECRET", secret.hex())
    with parse_device(f"board://127.0.0.1:{port}") as dev:
        assert dev.hello()["device"] == "secure"
        assert dev.request({"op": "fetch", "path": "x.edgert"})[1] == b"x"


def test_a_host_refuses_an_agent_that_cannot_prove_the_secret(tmp_path: Path) -> None:
    server = tcp_server(Agent(tmp_path / "impostor"), "127.0.0.1", 0)  # no secret at all
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with pytest.raises(AuthError, match="holds no device secret"):
        parse_device(f"board://127.0.0.1:{server.server_address[1]}").authenticate(new_secret())
    server.shutdown()
    server.server_close()
    with pytest.raises(AuthError, match="without a device secret"):
        tcp_server(Agent(tmp_path / "open"), "0.0.0.0", 0)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgert.deploy.agent",
            "--root",
            str(tmp_path / "a"),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "refusing to bind 0.0.0.0 without --secret-file" in res.stderr


def test_agent_bounds_names_idle_sockets_uploads_and_lengths(
    secure_agent: tuple[Agent, int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, port, secret = secure_agent
    monkeypatch.setenv("EDGERT_DEVICE_SECRET", secret.hex())
    digest = hashlib.sha256(b"").hexdigest()
    with parse_device(f"board://127.0.0.1:{port}") as dev:
        art = small_artifact(agent.root.parent)
        dev.deploy(art)
        hidden = f".{art.name}.sha256"  # the agent's own digest file
        with pytest.raises(DeviceError, match=r"artifact name '\.demo\.edgert\.sha256' is refused"):
            dev.request({"op": "put_begin", "name": hidden, "size": 0, "sha256": digest})
        assert [a["sha256"] for a in dev.request({"op": "list"})[0]["artifacts"]] == [
            hashlib.sha256(art.read_bytes()).hexdigest()
        ]
        for bad in ({"offset": 0, "length": -1}, {"offset": -5, "length": 10}, {"offset": 0, "length": 1 << 30}):
            with pytest.raises(DeviceError, match=r"must be an integer from 0 to"):
                dev.request({"op": "fetch", "path": art.name, **bad})
        with pytest.raises(DeviceError, match="'size' must be an integer"):
            dev.request({"op": "put_begin", "name": "n.edgert", "size": -1, "sha256": digest})
        refused = 0
        for i in range(500):
            try:
                dev.request({"op": "put_begin", "name": f"f{i}.edgert", "size": 10, "sha256": digest})
            except DeviceError as exc:
                assert "too many uploads open on this connection" in str(exc)
                refused += 1
        assert refused == 500 - MAX_UPLOADS_PER_CONNECTION
        assert len(list(agent.root.glob(".*.part"))) == MAX_UPLOADS_PER_CONNECTION
    for _ in range(50):  # the connection closed: its uploads are dropped
        if not list(agent.root.glob(".*.part")):
            break
        time.sleep(0.05)
    assert not list(agent.root.glob(".*.part"))

    # 30 connections that announce a big frame and send nothing: each is closed after the idle timeout.
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
    for s in idle:
        s.sendall(b"EDGT" + (100).to_bytes(4, "big") + (1 << 25).to_bytes(4, "big"))
    t = time.monotonic()
    for s in idle:
        s.settimeout(10)
        assert s.recv(1) == b""
        s.close()
    assert time.monotonic() - t < 5
    with parse_device(f"board://127.0.0.1:{port}") as dev:  # still serving
        assert dev.hello()["device"] == "secure"


def test_connections_past_the_cap_get_one_refusal(tmp_path: Path) -> None:
    server = tcp_server(Agent(tmp_path / "d"), "127.0.0.1", 0, idle_timeout=5, max_connections=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    held = [parse_device(f"board://127.0.0.1:{port}") for _ in range(2)]
    assert all(d.hello()["device"] for d in held)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        data = b""
        while block := s.recv(4096):
            data += block
    assert "serves 2 connections at most" in decode_frame(data)[0]["error"]
    for d in held:
        d.close()
    server.shutdown()
    server.server_close()


# -- faults on links -------------------------------------------------------------------------------


def test_interrupted_deploys_keep_a_whole_artifact_and_retries_succeed(tmp_path: Path) -> None:
    faults = load_tool("deploy_faults")
    summary = faults.run(cases=15, seed=7, folder=tmp_path)
    assert summary["failures"] == []
    assert summary["old_or_new_kept"] == 15 and summary["retry_succeeded"] == 15
    assert all(n == 5 for n in summary["by_kind"].values())
    assert summary["interrupted"] >= 10  # drops and kills always cut a deploy short


@pytest.mark.slow  # an agent process per kill, an sshd: about 10 s for both links
@pytest.mark.parametrize("link", ["serial", "ssh"])
def test_interrupted_deploys_over_serial_and_ssh(tmp_path: Path, link: str) -> None:
    """The same faults over a pseudo-terminal line to an agent process, and over ssh to a local sshd."""
    faults = load_tool("deploy_faults")
    summary = faults.run(cases=3, seed=3, folder=tmp_path, link=link)
    assert summary["failures"] == [] and summary["link"] == link
    assert summary["old_or_new_kept"] == 3 and summary["retry_succeeded"] == 3
    assert summary["by_kind"] == {"drop": 1, "kill": 1, "corrupt": 1}
    assert summary["interrupted"] >= 2


def test_rpc_sessions_authenticate_inside_the_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgert.deploy.agent import rpc_server

    secret = new_secret()
    listener, _ = rpc_server(Agent(tmp_path / "d", name="rpc-device", secret=secret), "127.0.0.1", 0)
    uri = f"rpc://127.0.0.1:{listener.getsockname()[1]}"
    with pytest.raises(AuthError, match="not authenticated: 'hello' refused"), parse_device(uri) as dev:
        dev.hello()
    monkeypatch.setenv("EDGERT_DEVICE_SECRET", new_secret().hex())
    with pytest.raises(AuthError, match="could not prove it holds this device's secret"):
        parse_device(uri)
    monkeypatch.setenv("EDGERT_DEVICE_SECRET", secret.hex())
    with parse_device(uri) as dev:
        assert dev.hello()["device"] == "rpc-device"
