"""A device farm on TVM's RPC tracker: two emulated rpi5 boards register with one tracker
(`edgert board start --count 2 --tracker`), `edgert farm status` lists them by key, and
`edgert profile --tracker --key rpi5` profiles the tiny Llama on both in one report; a board
killed in the middle of a second fleet profile is named in that report and the other finishes."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from edgert.deploy import board_fleet, farm

pytestmark = pytest.mark.slow


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


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[dict]]]:
    """A tracker (in a folder of its own) with two emulated rpi5 boards registered."""
    folder = tmp_path_factory.mktemp("farm")
    mp = pytest.MonkeyPatch()
    mp.setattr(farm, "farm_dir", lambda: folder)
    assert not board_fleet.fleet_status(), "emulated fleet boards already run here"
    state = farm.start_tracker("127.0.0.1", _free_port())
    tracker = f"{state['host']}:{state['port']}"
    try:
        proc = run_cli("board", "start", "--target", "rpi5", "--count", "2", "--tracker", tracker)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("registered with") == 2
        yield tracker, board_fleet.fleet_status()
    finally:
        board_fleet.stop_fleet()
        assert farm.stop_tracker()
        mp.undo()


def test_two_boards_one_tracker_one_fleet_report(fleet, tiny_rpi5_artifact: Path, tmp_path: Path) -> None:
    tracker, boards = fleet
    assert len(boards) == 2
    _wait_for(tracker, "rpi5", free=2)
    status = run_cli("farm", "status", "--tracker", tracker, "--json")
    assert status.returncode == 0, status.stderr
    listed = json.loads(status.stdout)["keys"]["rpi5"]
    assert listed["free"] == 2 and len(listed["devices"]) == 2

    report = tmp_path / "fleet.html"
    args = ["--tracker", tracker, "--key", "rpi5", "--devices", "all", "--runs", "1", "-n", "4"]
    args += ["--report", str(report)]
    proc = run_cli("profile", str(tiny_rpi5_artifact), *args)
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


def test_a_board_killed_mid_run_is_named_and_the_other_finishes(
    fleet, tiny_rpi5_artifact: Path, tmp_path: Path
) -> None:
    tracker, boards = fleet
    _wait_for(tracker, "rpi5", free=2)
    victim = boards[0]
    report = tmp_path / "fleet.html"
    result: dict = {}

    def profile() -> None:
        options = {"runs": 2, "max_tokens": 16}
        result["paths"] = farm.fleet_profile(tiny_rpi5_artifact, tracker, "rpi5", report, devices=2, **options)

    worker = threading.Thread(target=profile)
    worker.start()
    _wait_for(tracker, "rpi5", free=0, leased=2)  # both leased: deploying or profiling now
    time.sleep(1.5)
    os.kill(victim["pid"], signal.SIGKILL)
    worker.join(timeout=120)
    assert not worker.is_alive()
    doc = json.loads(result["paths"]["json"].read_text())
    assert [d["device"]["name"] for d in doc["devices"]] == [boards[1]["name"]]
    assert len(doc["failures"]) == 1 and doc["failures"][0]["device"] == victim["name"]
    assert doc["failures"][0]["error"]
    assert victim["name"] in report.read_text() and "Failed devices" in report.read_text()
