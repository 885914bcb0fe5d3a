"""The peer benchmark's LM section runs both engines end to end (tiny model, few tokens).

Speed is not asserted (the figures come from tools/bench_peers.py runs); the test checks that
every row is measured for both engines and that the roofline bound is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_tool, run_tool

pytestmark = [pytest.mark.slow, pytest.mark.reference]


def test_llm_section_measures_both_engines(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency: tools/setup.sh --test")
    gguf = load_tool("make_tiny_gguf").write_tiny_llama(tmp_path / "tiny.Q4_1.gguf", "Q4_1")
    out = tmp_path / "rows.json"
    args = ["--only", "llm", "--llm-model", str(gguf), "--threads", "1", "--repeats", "2"]
    args += ["--llm-prompt-tokens", "12", "--llm-gen-tokens", "4", "--llm-context", "64", "--json", str(out)]
    proc = run_tool("bench_peers", *args)
    assert proc.returncode == 0, proc.stderr
    rows = {r["metric"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {
        "decode",
        "prefill",
        "load to first token (total)",
        "load: import of the runtime",
        "load: model load",
        "load: first prefill and token",
        "peak RSS",
        "RSS while decoding (total)",
        "RSS while decoding (growth over the runtime's baseline)",
        "model size",
        "compile",
    }
    for metric, row in rows.items():
        assert row["edgert"] > 0, metric
        if metric != "compile":
            assert row["peer"] > 0 and row["peer_name"] == "llama.cpp" and row["ratio"] > 0, metric
    assert len(rows["decode"]["extra"]["runs"]) == 2
    assert "tok/s" in rows["decode"]["extra"]["roofline"] and "GB/s" in rows["decode"]["extra"]["roofline"]
    # The roofline's parts: the bytes a token reads (weights, and the keys and values so far) and the
    # bandwidth with its spread, best first.
    reads, bandwidth = rows["decode"]["extra"]["bytes_per_token"], rows["decode"]["extra"]["bandwidth_gbs"]
    assert reads["weights"] > 0 and reads["kv"] > 0 and reads["total"] == reads["weights"] + reads["kv"]
    assert bandwidth["best_gbs"] >= bandwidth["median_gbs"] >= bandwidth["worst_gbs"] > 0
    assert float(rows["decode"]["extra"]["of_roofline"].split()[0]) > 0
    assert rows["RSS while decoding (total)"]["extra"]["weights_plus_kv_mib"] > 0
    growth = rows["RSS while decoding (growth over the runtime's baseline)"]
    assert 0 < growth["edgert"] < rows["RSS while decoding (total)"]["edgert"]
    assert growth["extra"]["edgert_baseline_mib"] > 0 and growth["extra"]["edgert_growth_over_weights_plus_kv"] > 0
    parts = sum(
        rows[f"load: {p}"]["edgert"] for p in ("import of the runtime", "model load", "first prefill and token")
    )
    assert parts == pytest.approx(rows["load to first token (total)"]["edgert"], rel=1e-6)


def test_roofline_alternates_the_bandwidth_probe_and_decode_runs(tiny_host_artifact: Path) -> None:
    """`llm.py roofline`: per round a burst of bandwidth passes and a decode run; the fraction is the
    decode's bytes per second over the bandwidth, per round, with its spread."""
    load_tool("replay_drafts")  # puts tools/ on the path, as the tools do for `peers`
    from peers import llm

    r = llm.roofline(tiny_host_artifact, 1, prompt_tokens=8, gen=4, rounds=2)
    reads = r["bytes_per_token"]
    assert reads["total"] == reads["weights"] + reads["kv"] and reads["kv"] > 0
    assert r["buffer_mib"] >= 512  # far above any last-level cache here
    assert r["fraction"]["min"] <= r["fraction"]["median"] <= r["fraction"]["max"]
    best = r["decode_tps"]["best"] * reads["total"] / (r["bandwidth_gbs"]["best"] * 1e9)
    assert r["fraction_of_bests"] == pytest.approx(best, rel=0.02)


def test_speculative_paired_ratio_pairs_each_repeat_with_its_own_plain_run() -> None:
    """`peers.paired_ratio` (the speculative and graph benches'): the quartiles of the repeats' own ratios,
    not the ratio of the medians (which pairs one repeat's plain decoding with another's mode)."""
    load_tool("replay_drafts")  # puts tools/ on the path, as the tools do for `peers`
    from peers import paired_ratio

    ours, base = [200.0, 110.0, 90.0], [100.0, 100.0, 90.0]  # ratios 2.0, 1.1, 1.0
    med, q1, q3 = paired_ratio(ours, base)
    assert med == pytest.approx(1.1)
    assert q1 == pytest.approx(1.05) and q3 == pytest.approx(1.55)
    assert paired_ratio([150.0, 100.0, 100.0], [100.0, 300.0, 50.0])[0] == pytest.approx(1.5)  # medians' ratio: 1.0
    assert paired_ratio([3.0], [2.0]) == (1.5, 1.5, 1.5)
