"""State probes for early exit on the tiny Llama: fitted and stored by calibration (safetensors, no pickle),
points slower than the full model refused, and the ``state`` policy leaving exactly where its probe fires."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgert.errors import EdgertError
from edgert.families.shared.calibration import choose_points, fit_probe
from edgert.runtime.exits import Budget, Confidence, EarlyExitDecoder, StateProbe, parse_exit_policy, probe_features
from edgert.runtime.layers import LayerStack, load_probes
from edgert.runtime.tvm_runtime import to_numpy


@pytest.fixture(scope="module")
def calibrated_tiny(tiny_host_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from edgert.profile.calibrate import calibrate

    art = tmp_path_factory.mktemp("probe") / "tiny.edgert"
    shutil.copyfile(tiny_host_artifact, art)
    result = calibrate(art, tokens=128, policies=("state", "confidence"), prompts=1, steps=8, skip_rounds=0)
    return art, result


def test_probe_fit_separates_what_a_linear_rule_separates() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8))
    y = x @ rng.normal(size=8) + 0.3 * rng.normal(size=400) > 0.5
    w, b, info = fit_probe(x, y)
    p = 1 / (1 + np.exp(-(x @ w + b[0])))
    assert np.mean((p >= 0.5) == y) > 0.9 and info["held_out_accuracy"] > 0.85
    assert info["held_out_log_loss"] < info["held_out_base_log_loss"]
    w, b, _ = fit_probe(x, np.ones(400, bool))  # one class only: the smoothed base rate
    assert not w.any() and 1 / (1 + np.exp(-b[0])) > 0.99


def test_a_budget_around_a_state_probe_decides_from_the_state() -> None:
    d = 8
    weight = np.zeros(d + 1, np.float32)
    weight[0] = 4.0  # fires when the first normalized feature is large
    policy = Budget(18, StateProbe(0.5, {15: (weight, np.zeros(1, np.float32)), 20: (weight, np.zeros(1, np.float32))}))
    assert not policy.reads_head and policy.exits([15, 20, 25], 30) == [15, 18]
    up, down = np.eye(d)[0], -np.eye(d)[0]
    assert policy.should_exit_state(15, up) and not policy.should_exit_state(15, down)
    assert policy.should_exit_state(18, down)  # the cap
    assert Budget(18).exits([15], 30) == [18] and not Budget(18).reads_head
    assert Budget(18, Confidence(0.9)).reads_head


def test_choose_points_never_stores_a_slower_point() -> None:
    def row(policy: str, t: float, agreement: float, speedup: float, expected: float) -> dict:
        return {
            "policy": policy,
            "threshold": t,
            "agreement": agreement,
            "mean_layers": 20 * t,
            "exit_heads_per_token": 1.0,
            "speedup": speedup,
            "expected_speedup": expected,
        }

    rows = [
        row("state", 0.5, 0.99, 0.9, 1.2),  # agrees most, measured slower
        row("state", 0.9, 0.95, 1.1, 1.05),
        row("state", 0.95, 0.97, 1.05, 0.98),  # expected slower
        row("confidence", 0.9, 0.99, 0.8, 0.7),
    ]
    said: list[str] = []
    chosen = choose_points(rows, 0.9, refuse_slower=True, log=said.append)
    assert list(chosen) == ["state"] and chosen["state"]["threshold"] == 0.9
    assert any("confidence: no point is faster" in s for s in said)
    assert choose_points(rows, 0.9)["confidence"]["threshold"] == 0.9  # without refusal: the old choice


def test_probes_are_stored_as_safetensors_and_load_without_pickle(calibrated_tiny, monkeypatch) -> None:
    import safetensors.numpy

    import edgert

    art, result = calibrated_tiny
    model = edgert.load(art)
    manifest = model.artifact.manifest["exits"]
    assert manifest["probes"]["layers"] == [1] and result["probes"]["held_out"]["1"]["base_rate"] >= 0
    # The member is plain safetensors: the reference reader opens it and finds the probe.
    stored = safetensors.numpy.load(model.artifact.read_bytes(manifest["adapters"]))
    d = int(model.artifact.manifest["model"]["hidden_size"])
    assert stored["probe.1.weight"].shape == (d + 1,) and stored["probe.1.bias"].shape == (1,)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    probes = load_probes(model.session)
    np.testing.assert_array_equal(probes[1][0], stored["probe.1.weight"])
    np.testing.assert_array_equal(probes[1][1], stored["probe.1.bias"])


def test_slower_policies_are_not_stored_and_a_bare_name_refuses_them(calibrated_tiny) -> None:
    import edgert

    art, result = calibrated_tiny
    # On two layers an exit head at layer 1 costs more than the layer it saves: never faster.
    assert "confidence" in result["refused"] and "confidence" not in result["policies"]
    model = edgert.load(art)
    for name, point in result["policies"].items():
        assert point["speedup"] >= 1.0 and point["expected_speedup"] >= 1.0, (name, point)
    for name in result["refused"]:
        with pytest.raises(EdgertError, match=r"no point of .* faster than the full model"):
            parse_exit_policy(name, model)
    assert parse_exit_policy("confidence:0.9", model).name == "confidence:0.9"  # a value still runs it


def test_state_policy_exits_only_where_its_probe_fires(tiny_host_artifact: Path) -> None:
    import edgert

    model = edgert.load(tiny_host_artifact)
    d = int(model.artifact.manifest["model"]["hidden_size"])
    weight = np.random.default_rng(0).normal(size=d + 1).astype(np.float32) * 0.5
    seen: list[np.ndarray] = []

    def decode(threshold: float) -> EarlyExitDecoder:
        seen.clear()
        decoder = EarlyExitDecoder(model, StateProbe(threshold, {1: (weight, np.zeros(1, np.float32))}))
        run = decoder.stack.run

        def spy(h, layers):  # the hidden state each decode step reaches exit 1 with
            layers = list(layers)
            out = run(h, layers)
            if layers == [0]:
                seen.append(to_numpy(out)[0, -1])
            return out

        decoder.stack.run = spy
        list(decoder.generate("Tell me about rivers.", max_tokens=16))
        return decoder

    decode(0.5)
    probability = [1 / (1 + np.exp(-(probe_features(h) @ weight))) for h in seen]
    threshold = float(np.median(probability))  # about half the steps fire
    decoder = decode(threshold)
    probability = np.array([1 / (1 + np.exp(-(probe_features(h) @ weight))) for h in seen])
    depths = np.array(decoder.stats.depths)
    assert len(depths) == len(probability) > 4
    np.testing.assert_array_equal(depths == 1, probability >= threshold)
    assert 0 < np.sum(depths == 1) < len(depths)  # both outcomes occurred
    assert set(depths) <= {1, 2}
    # The head ran only at the exits taken: a check costs no head.
    assert decoder.stats.head_calls == int(np.sum(depths == 1))
    assert isinstance(decoder.stack, LayerStack)
