"""Early exit on SmolLM2: exit policies, tuned-lens adapters and their calibration stored in the artifact."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgert.errors import EdgertError
from edgert.profile.calibrate import calibrate
from edgert.runtime.exits import (
    Budget,
    Confidence,
    EarlyExitDecoder,
    Patience,
    StaticDepth,
    default_exits,
    parse_exit_policy,
    range_spans,
)
from edgert.runtime.layers import LayerStack

HELD_OUT = ["Tell me about the moon.", "How do bees make honey?"]


@pytest.fixture(scope="module")
def calibrated(smollm_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """A copy of the SmolLM2 artifact calibrated by `edgert calibrate`'s library function (small settings)."""
    folder = tmp_path_factory.mktemp("exits")
    art = folder / "smollm2-exits.edgert"
    shutil.copyfile(smollm_artifact, art)
    result = calibrate(
        art,
        tokens=256,
        target_agreement=0.8,
        policies=("state",),
        prompts=2,
        steps=24,
        skip_rounds=0,
        out=folder / "plots",
    )
    return art, result, folder / "plots"


def test_policies_decide_as_documented() -> None:
    sure, unsure = np.array([10.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])
    assert Confidence(0.9).should_exit(10, sure) and not Confidence(0.9).should_exit(10, unsure)
    assert StaticDepth(12).exits([15, 20], 30) == [12]
    patience = Patience(2)
    patience.start()
    assert not patience.should_exit(15, sure) and patience.should_exit(20, sure)
    patience.start()
    assert not patience.should_exit(15, sure) and not patience.should_exit(20, np.array([0.0, 9.0, 0.0]))
    budget = Budget(18, Confidence(0.99))
    assert budget.exits([15, 20, 25], 30) == [15, 18] and budget.should_exit(18, unsure)


@pytest.mark.slow
def test_calibration_fits_adapters_that_help_and_stores_them(calibrated) -> None:
    art, result, plots = calibrated
    lens = result["calibration"]["held_out_agreement"]
    assert len(lens) == len(result["layers"]) >= 2
    # The tuned lens predicts the final layer's token better than the raw head at every exit.
    assert all(v["tuned_agreement"] >= v["raw_agreement"] for v in lens.values())
    assert sum(v["tuned_agreement"] - v["raw_agreement"] for v in lens.values()) > 0.1
    assert (plots / "exit_sweep.png").stat().st_size > 1000
    rows = (plots / "exit_sweep.csv").read_text().splitlines()
    assert rows[0].startswith("policy,threshold,agreement,mean_layers") and len(rows) == 7
    import edgert

    manifest = edgert.load(art).artifact.manifest
    exits = manifest["exits"]
    # The state policy is stored (at a point faster than the full model, measured and expected) or refused.
    assert set(exits["policies"]) ^ set(exits["refused"]) == {"state"}
    for point in exits["policies"].values():
        assert point["threshold"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
        assert point["speedup"] >= 1.0 and point["expected_speedup"] >= 1.0
    assert exits["probes"]["layers"] == exits["layers"]
    assert "exits.safetensors" in manifest["files"]


@pytest.mark.slow
def test_early_exit_uses_fewer_layers_at_the_calibrated_agreement(calibrated) -> None:
    import edgert

    art, result, plots = calibrated
    model = edgert.load(art)
    if "state" in result["policies"]:
        point = result["policies"]["state"]
        policy = parse_exit_policy("state", model)  # the calibrated threshold
    else:  # refused as slower here: a bare name says so, and the sweep's earliest-leaving point runs by value
        with pytest.raises(EdgertError, match="faster than the full model"):
            parse_exit_policy("state", model)
        with (plots / "exit_sweep.csv").open() as fh:
            row = min(csv.DictReader(fh), key=lambda r: float(r["mean_layers"]))
        point = {k: float(v) for k, v in row.items() if k != "policy"}
        policy = parse_exit_policy(f"state:{point['threshold']:g}", model)
    assert policy.name == f"state:{point['threshold']:g}"
    decoder = EarlyExitDecoder(model, policy)
    reference = [t.id for t in model.generate(HELD_OUT[0], max_tokens=32, chat=True)]
    agreement = decoder.agreement(HELD_OUT[0], reference, chat=True)
    assert decoder.stats.mean_layers < decoder.stats.num_layers
    # The calibration states the agreement it measured on its prompts; held-out text reaches it within 0.15.
    assert agreement >= point["agreement"] - 0.15, (agreement, point)
    static = EarlyExitDecoder(model, parse_exit_policy("static:20+budget:25", model))
    out = [t.id for t in static.generate(HELD_OUT[1], max_tokens=8, chat=True)]
    assert len(out) >= 1 and static.stats.depths == [20] * len(static.stats.depths)


@pytest.mark.slow
def test_bad_exit_options_are_named(smollm) -> None:
    for spec, words in [
        ("fastest:1", "unknown policy"),
        ("confidence:high", "not a number"),
        ("confidence:0.9+entropy:1", "not two policies"),
        ("patience:1", "at least 2"),
        ("entropy", "needs a value"),
    ]:
        with pytest.raises(EdgertError, match=words):
            parse_exit_policy(spec, smollm)


@pytest.mark.slow
def test_layer_span_entries_match_per_layer_calls(smollm) -> None:
    """``layers_<a>_<b>`` and ``kv_fill_<a>_<b>`` give what the per-layer entries give, one call per span."""
    n = int(smollm.artifact.manifest["model"]["num_layers"])
    layer_spans, fill_spans = range_spans(n)
    assert layer_spans[0] == (0, default_exits(n)[0]) and fill_spans
    names = smollm.artifact.manifest["entry_points"]
    assert all(f"layers_{a}_{b}" in names for a, b in layer_spans)
    assert all(f"kv_fill_{a}_{b}" in names for a, b in fill_spans)
    ids = smollm.tokenizer.encode("The river runs to the sea, and the sea")
    exit_at = fill_spans[0][0]

    def logits(spans: bool) -> np.ndarray:
        """Prompt through the whole stack, one token exiting at the first exit (copy-forward), one more token."""
        stack = LayerStack(smollm.session, smollm.cache, {}, spans=spans)
        calls = []
        for name in ("_layers", "_fills"):  # count the VM calls
            setattr(stack, name, [_counted(f, calls) for f in getattr(stack, name)])
        smollm.reset()
        for chunk, depth in ((ids, n), ([ids[-1]], exit_at)):
            smollm.cache.begin(len(chunk))
            h = stack.run(stack.embed(chunk), range(depth))
            stack.fill(h, range(depth, n))
            smollm.cache.end(len(chunk))
        smollm.cache.begin(1)
        out = stack.logits(stack.run(stack.embed([ids[0]]), range(n)))[-1]
        smollm.cache.end(1)
        smollm.reset()
        return out, len(calls)

    spanned, spanned_calls = logits(True)
    single, single_calls = logits(False)
    np.testing.assert_allclose(spanned, single, rtol=1e-4, atol=1e-3)
    assert int(np.argmax(spanned)) == int(np.argmax(single))
    assert single_calls == 3 * n and spanned_calls == 0  # every span ran as its own entry point


def _counted(fn, calls: list) -> object:
    def wrapped(*args):
        calls.append(1)
        return fn(*args)

    return wrapped
