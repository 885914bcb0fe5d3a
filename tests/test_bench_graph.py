"""The peer benchmark's zoo section: both engines alternated, ratios paired per round.

Speed is not asserted (the figures come from tools/bench_peers.py runs); the test checks that each
latency row has both engines' medians and a paired ratio inside its quartiles, that the printed
ratio is its inverse, and that the outputs agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_tool, run_tool

pytestmark = [pytest.mark.slow, pytest.mark.reference]


def test_zoo_section_pairs_the_engines_rounds(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    zoo = tmp_path / "zoo"
    load_tool("make_graph_zoo").write(zoo, only=["mobilenet"], small=True, int8=False)
    out = tmp_path / "rows.json"
    proc = run_tool(
        "bench_peers", "--only", "graph", "--zoo", str(zoo), "--repeats", "5", "--zoo-block", "2", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    rows = {(r["case"], r["metric"]): r for r in json.loads(out.read_text())}
    for case in ("mobilenet", "geomean float (1)"):
        for threads in (1, 2):
            row = rows[(case, f"latency t{threads}")]
            assert row["edgert"] > 0 and row["peer"] > 0 and row["peer_name"] == "onnxruntime"
            assert row["paired"] > 0 and row["ratio"] == pytest.approx(1.0 / row["paired"])
            if case == "mobilenet":
                q1, q3 = (float(v) for v in row["extra"]["q1-q3"].split("-"))
                # the note's quartiles are written to 3 decimals: compare the median written alike
                assert q1 <= round(row["paired"], 3) <= q3
                assert float(row["extra"]["max_abs_diff"]) < 1e-4
                # every round's block medians are kept, and the order split is of those rounds
                rounds = row["rounds"]
                assert len(rounds) == 5 and all(a > 0 and b > 0 for a, b in rounds)
                ratios = [a / b for a, b in rounds]
                first, second = (float(v) for v in row["extra"]["first/second"].split("/"))
                assert min(ratios[::2]) - 1e-3 <= first <= max(ratios[::2]) + 1e-3
                assert min(ratios[1::2]) - 1e-3 <= second <= max(ratios[1::2]) + 1e-3


def test_a_benchmark_child_that_dies_is_an_error_not_a_wait() -> None:
    import multiprocessing
    import os

    load_tool("replay_drafts")  # puts tools/ on the path, as the tools do for `peers`
    from peers.graph import _answer

    ctx = multiprocessing.get_context("spawn")
    parent, _child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=os._exit, args=(3,))  # ends before it answers
    proc.start()
    with pytest.raises(RuntimeError, match=r"onnxruntime: .*ended without an answer \(exit code 3\)"):
        _answer(parent, proc, "onnxruntime")
    proc.join()
