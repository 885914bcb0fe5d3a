"""A device farm on TVM's RPC tracker.

Slow: two emulated rpi5 boards register with one tracker (`edgert board start --count 2 --tracker`),
`edgert farm status` lists them by key, and `edgert profile --tracker --key rpi5` profiles the tiny
Llama on both in one report. Quick: three light agents on this host register with a tracker; in a
fleet profile one is killed and one hangs (stopped, its connection kept): both are named in the
report, the third finishes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from edgert.deploy import board_fleet, farm
from edgert.deploy.device_secrets import ENV, write_agent_copy
from edgert.deploy.protocol import new_secret


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(tracker: str, key: str, free: int, leased: int = 0, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        entry = farm.summary(tracker).get(key, {})
        if entry.get("free") == free and entry.get("leased") == leased:
            return entry
        assert time.monotonic() < deadline, f"the tracker shows {entry}, not {free} free / {leased} leased"
        time.sleep(0.3)


@pytest.fixture
def tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """TVM's tracker, started with its state in a folder of its own."""
    monkeypatch.setattr(farm, "farm_dir", lambda: tmp_path)
    state = farm.start_tracker("127.0.0.1", _free_port())
    try:
        yield f"{state['host']}:{state['port']}"
    finally:
        assert farm.stop_tracker()


@pytest.mark.slow
def test_two_boards_one_tracker_one_fleet_report(tracker: str, tiny_rpi5_artifact: Path, tmp_path: Path) -> None:
    assert not board_fleet.fleet_status(), "emulated fleet boards already run here"
    try:
        proc = run_cli("board", "start", "--target", "rpi5", "--count", "2", "--tracker", tracker)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("registered with") == 2
        boards = board_fleet.fleet_status()
        assert len(boards) == 2
        _wait_for(tracker, "rpi5", free=2)
        status = run_cli("farm", "status", "--tracker", tracker, "--json")
        assert status.returncode == 0, status.stderr
        listed = json.loads(status.stdout)["keys"]["rpi5"]
        assert listed["free"] == 2 and len(listed["devices"]) == 2

        report = tmp_path / "fleet.html"
        args = ["--tracker", tracker, "--key", "rpi5", "--devices", "all", "--runs", "1", "-n", "4"]
        proc = run_cli("profile", str(tiny_rpi5_artifact), *args, "--report", str(report))
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(report.with_suffix(".json").read_text())
        assert doc["failures"] == []
        names = {d["device"]["name"] for d in doc["devices"]}
        assert names == {b["name"] for b in boards}
        decode = doc["summary"]["decode_ms"]
        assert len(decode["devices"]) == 2
        for row in decode["devices"]:
            assert 0 < row["median"] <= row["p90"]
        medians = [row["median"] for row in decode["devices"]]
        assert decode["spread"]["max_over_min"] == pytest.approx(max(medians) / min(medians), rel=1e-2)
        html = report.read_text()
        assert "emulated" in html and all(n in html for n in names)
        for metric in ("decode_ms", "prefill_ms", "load_seconds", "peak_rss_mb"):
            assert Path(f"{report.with_suffix('')}.{metric}.png").stat().st_size > 1000
        _wait_for(tracker, "rpi5", free=2)  # the leases ended: both boards are back in the queue
    finally:
        board_fleet.stop_fleet()


def test_a_killed_and_a_hung_device_are_named_and_the_third_finishes(
    tracker: str, tiny_host_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = new_secret()
    monkeypatch.setenv(ENV, secret.hex())
    key = "farmtest"
    agents: dict[str, subprocess.Popen] = {}
    try:
        for who in ("killed", "hung", "healthy"):
            folder = tmp_path / who
            argv = [sys.executable, "-m", "edgert.deploy.agent", "--root", str(folder / "agent"), "--host", "127.0.0.1"]
            argv += ["--rpc-port", "0", "--tracker", tracker, "--key", key, "--name", f"local {who}"]
            argv += ["--secret-file", str(write_agent_copy(secret, folder / "agent.secret"))]
            log = (folder / "agent.log").open("wb")
            agents[f"local {who}"] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        _wait_for(tracker, key, free=3)

        real = farm._profile_one

        def misbehave(dev, artifact, options):  # after the lease and the hello: mid-run
            proc = agents[dev.name]
            if dev.name == "local killed":
                os.kill(proc.pid, signal.SIGKILL)
            elif dev.name == "local hung":
                os.kill(proc.pid, signal.SIGSTOP)  # alive, its connection open, never answering
            return real(dev, artifact, options)

        monkeypatch.setattr(farm, "_profile_one", misbehave)
        report = tmp_path / "fleet.html"
        paths = farm.fleet_profile(
            tiny_host_artifact, tracker, key, report, devices=3, call_timeout=6, runs=1, max_tokens=4
        )
        doc = json.loads(paths["json"].read_text())
        assert [d["device"]["name"] for d in doc["devices"]] == ["local healthy"]
        failed = {f["device"]: f["error"] for f in doc["failures"]}
        assert set(failed) == {"local killed", "local hung"}
        assert re.search(r"no answer within 6 s", failed["local hung"]), failed
        assert "no answer" not in failed["local killed"], failed
        assert "local killed" in report.read_text() and "Failed devices" in report.read_text()
    finally:
        for proc in agents.values():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_fleet_report_of_a_graph_artifact(tmp_path: Path) -> None:
    """A graph artifact's profiles (no decode step) in a fleet report: the summary and the headlines take
    its call times. (Leasing and deploying are the same for every artifact: the tests above.)"""
    from conftest import load_tool

    import edgert
    from edgert.profile.measure import profile_graph
    from edgert.profile.report import fleet_headlines, write_fleet_report

    graph = load_tool("make_tiny_onnx").write(tmp_path / "onnx", ["dense"])["dense"]
    edgert.compile(str(graph), output=tmp_path / "dense.edgert")
    results = []
    for who in ("board a", "board b"):  # what `farm._profile_one` returns per device, from the agent's profile
        result = profile_graph(edgert.load(tmp_path / "dense.edgert"), runs=5, operators=False)
        result |= {"load_seconds": 0.1, "device": {"name": who, "emulated": False}, "link": {"uri": f"rpc://{who}"}}
        results.append(result)
    failed = [{"device": "board c", "lease": "rpc://c", "error": "refused", "kind": "DeviceError"}]
    paths = write_fleet_report(
        results, failed, tmp_path / "fleet.html", {"tracker": "t:1", "key": "k", "artifact": "dense.edgert"}
    )
    doc = json.loads(paths["json"].read_text())
    assert set(doc["summary"]) == {"call_ms", "load_seconds", "peak_rss_mb"}
    rows = doc["summary"]["call_ms"]["devices"]
    assert [r["median"] for r in rows] == [r["call_ms"]["p50"] for r in results]
    assert all(0 < r["median"] <= r["p90"] for r in rows)
    assert paths["call_ms"].stat().st_size > 1000 and "graph call" in paths["html"].read_text()
    lines = fleet_headlines(doc)
    assert re.fullmatch(r"board a: call p50 [0-9.]+ ms, p90 [0-9.]+ ms", lines[0]), lines
    assert lines[2].startswith("spread of call medians across devices: max/min ")
