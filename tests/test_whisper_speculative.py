"""Speculative greedy decoding on Whisper tiny.en's decoder: identical to plain greedy decoding.

The self draft skips decoder layers (or exits after the first ones) and shares the window's
cross-attention K/V with the verify pass; the lookup draft copies the previous window's text or
an earlier hypothesis of the same audio. The transcript must match the plain greedy one token
for token on the Whisper test audio (which itself matches faster-whisper, tests/test_whisper.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from test_whisper import SENTENCES, beckett_wav, synthesize

from edgert.errors import EdgertError
from edgert.runtime.audio import read_wav

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def beckett_plain(transcriber):
    samples = read_wav(beckett_wav()).samples
    return samples, transcriber.transcribe(samples, beam_size=1)


@pytest.mark.parametrize("spec", ["self:k=4", "self:k=3,exit=2"])
def test_speculative_transcript_identical(whisper_artifact: Path, beckett_plain, spec: str) -> None:
    from edgert.families.whisper.transcriber import Transcriber

    samples, plain = beckett_plain
    fast = Transcriber(whisper_artifact, speculative=spec)
    ours = fast.transcribe(samples, beam_size=1)
    assert [s.tokens for s in ours.segments] == [s.tokens for s in plain.segments]
    assert ours.text == plain.text and len(plain.text) > 40
    assert [(s.start, s.end) for s in ours.segments] == [(s.start, s.end) for s in plain.segments]
    for a, b in zip(ours.segments, plain.segments, strict=True):
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-3)
    stats = fast.speculative.stats
    assert stats.drafted > 0 and 0 < stats.accepted <= stats.drafted
    # each verify pass emits its accepted drafts plus one token: fewer full-decoder passes than tokens
    full_passes = stats.rounds + fast.model.calls["decode"]
    assert full_passes < sum(len(s.tokens) for s in plain.segments)
    with pytest.raises(EdgertError, match="greedy"):
        fast.decode_window(fast.encode(fast.features(samples[:16000])), beam_size=5)


@pytest.mark.parametrize("spec", ["self:k=4", "lookup:k=4"])
def test_speculative_cli_reports_acceptance(whisper_artifact: Path, beckett_plain, spec: str) -> None:
    _, plain = beckett_plain
    proc = run_cli("transcribe", str(whisper_artifact), str(beckett_wav()), "--speculative", spec, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["text"] == plain.text and out["beam_size"] == 1
    drafts = out["speculative"]
    assert 0 <= drafts["accepted"] <= drafts["drafted"] and 0 <= drafts["acceptance_rate"] <= 1
    if spec.startswith("self"):  # one window, no earlier text: lookup may find nothing to draft
        assert drafts["acceptance_rate"] > 0


def test_early_exit_decoder(whisper_artifact: Path, beckett_plain) -> None:
    """Confidence 0.9 (agreement 1.0 on espeak-ng speech, measured apart from this audio) skips layers
    on some tokens and keeps the transcript; static depth runs exactly that many layers per token."""
    from edgert.families.whisper.transcriber import Transcriber

    samples, plain = beckett_plain
    t = Transcriber(whisper_artifact, exit="confidence:0.9")
    ours = t.transcribe(samples, beam_size=1)
    assert ours.text == plain.text
    assert 3.0 < t.early_exit.mean_layers < 4.0 and len(t.early_exit.depths) >= len(plain.segments)
    proc = run_cli("transcribe", str(whisper_artifact), str(beckett_wav()), "--exit", "static:2", "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["early_exit"]
    assert stats["mean_layers"] == 2.0 and stats["tokens"] > 0 and stats["policy"] == "static:2"


def test_lookup_transcript_identical(whisper_artifact: Path, transcriber, tmp_path: Path) -> None:
    """Long-form: 40 s of espeak-ng speech (two windows), the second drafting from the first's text
    (prompt and cut-off tail); streaming-style: a longer piece of the same audio drafting from the
    shorter piece's hypothesis. The tokens are plain greedy decoding's."""
    import numpy as np

    from edgert.families.whisper.transcriber import Transcriber

    pause = np.zeros(8000, np.float32)
    parts = [np.concatenate([synthesize(s, tmp_path / f"{i}.wav"), pause]) for i, s in enumerate(SENTENCES)]
    samples = np.concatenate(parts * 2)
    plain = transcriber.transcribe(samples, beam_size=1)
    fast = Transcriber(whisper_artifact, speculative="lookup")
    fast.speculative.gate = None  # draft whenever there is a draft: the counts below do not hang on timing
    ours = fast.transcribe(samples, beam_size=1)
    assert plain.stats.windows == 2 and len(plain.text) > 200
    assert [s.tokens for s in ours.segments] == [s.tokens for s in plain.segments]
    assert [(s.start, s.end) for s in ours.segments] == [(s.start, s.end) for s in plain.segments]
    stats = fast.speculative.stats
    assert 0 < stats.accepted < stats.drafted and stats.plain_steps > 0
    # Each verify pass emits its accepted drafts plus one token: fewer decoder passes than tokens.
    assert stats.rounds + fast.model.calls["decode"] < sum(len(s.tokens) for s in plain.segments)

    beckett = read_wav(beckett_wav()).samples
    earlier, _ = fast.decode_window(fast.encode(fast.features(beckett[:80000])), timestamps=False)
    cross = fast.encode(fast.features(beckett[:128000]))
    want, _ = transcriber.decode_window(cross, timestamps=False)
    accepted, prefills = stats.accepted, fast.model.calls["prefill"]
    got, _ = fast.decode_window(cross, timestamps=False, reference=earlier.tokens)
    assert got.tokens == want.tokens and len(want.tokens) > len(earlier.tokens) > 5
    assert stats.accepted - accepted >= len(earlier.tokens) // 2  # the shorter piece's words were drafted
    assert fast.model.calls["prefill"] == prefills  # the short prompt's pass verified the first drafts


def test_verify_entry_gives_the_layer_by_layer_logits(transcriber) -> None:
    """The ``verify`` entry point (the whole decoder in one call) gives the logits the ``embed``,
    ``layer_<i>`` and ``head`` entries give one by one, on a verify pass of 7 tokens, and its first
    row is a plain one-token step's."""
    import numpy as np

    from edgert.runtime.seq2seq_speculative import DecoderLayers

    model = transcriber.model
    layers = DecoderLayers(model)
    assert layers._verify is not None
    cross = transcriber.encode(transcriber.features(read_wav(beckett_wav()).samples[:48000]))
    prompt = [transcriber.config["sot"], transcriber.config["no_timestamps"]]
    tokens = [440, 2068, 7586, 21831, 18045, 625, 262]
    model.cache.reset()
    seq = model.cache.add()
    model.prefill(seq, prompt, cross)
    one = model.step([seq], tokens[:1], cross)[0]
    model.cache.popn(seq, 1)
    fused = layers.forward(seq, tokens, cross, range(layers.num_layers))
    model.cache.popn(seq, len(tokens))
    layers._verify = None  # the layer-by-layer path
    split = layers.forward(seq, tokens, cross, range(layers.num_layers))
    assert fused.shape == split.shape == (len(tokens), model.vocab_size)
    np.testing.assert_allclose(fused, split, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(fused[0], one, rtol=1e-5, atol=1e-4)
    assert fused.argmax(-1).tolist() == split.argmax(-1).tolist()


@pytest.mark.parametrize(("prompt_len", "rows"), [(2, 2), (11, 5), (13, 9), (40, 16)])
def test_verify_rows_are_decode_steps_bit_for_bit(transcriber, prompt_len: int, rows: int) -> None:
    """A verify pass runs as decode rows of one sequence (`DecoderLayers.begin`): each row's logits
    are the plain decode step's at that position exactly, across page boundaries (pages of 16), and
    the step after the pass sees the cache a plain decode would have left. Bit equality is what makes
    lookup drafting lossless without a tie-break: a verify row can never pick another token."""
    import numpy as np

    from edgert.runtime.seq2seq_speculative import DecoderLayers

    model = transcriber.model
    layers = DecoderLayers(model)
    assert layers.rows >= 16  # the host build states the row kernels (`kv_cache.verify_rows`)
    cross = transcriber.encode(transcriber.features(read_wav(beckett_wav()).samples[:48000]))
    rng = np.random.default_rng(prompt_len)
    prompt = [transcriber.config["sot"], *(int(t) for t in rng.integers(200, 20000, prompt_len - 1))]
    tokens = [int(t) for t in rng.integers(200, 20000, rows)]
    model.cache.reset()
    seq = model.cache.add()
    model.prefill(seq, prompt, cross)
    steps = np.stack([model.step([seq], [t], cross)[0] for t in tokens])
    after = model.step([seq], [262], cross)[0]
    model.cache.popn(seq, rows + 1)
    fused = layers.forward(seq, tokens, cross, range(layers.num_layers))
    assert model.cache.lengths[seq] == prompt_len + rows
    np.testing.assert_array_equal(fused, steps)
    np.testing.assert_array_equal(model.step([seq], [262], cross)[0], after)


@pytest.mark.parametrize("prompt_len", [2, 9])
def test_prompt_as_rows_is_the_prefill_bit_for_bit(transcriber, prompt_len: int) -> None:
    """Lookup drafting verifies its first drafts in the prompt's own pass (`LookupSeq2Seq._start`):
    from an empty cache, a short prompt run as decode rows gives the prefill's logits at its last
    position exactly and leaves the cache the prefill leaves (the next step's logits are equal)."""
    import numpy as np

    from edgert.runtime.seq2seq_speculative import DecoderLayers

    model = transcriber.model
    layers = DecoderLayers(model)
    cross = transcriber.encode(transcriber.features(read_wav(beckett_wav()).samples[:48000]))
    rng = np.random.default_rng(prompt_len)
    prompt = [transcriber.config["sot"], *(int(t) for t in rng.integers(200, 20000, prompt_len - 1))]
    model.cache.reset()
    seq = model.cache.add()
    plain = model.prefill(seq, prompt, cross)
    after = model.step([seq], [262], cross)[0]
    model.cache.reset()
    seq = model.cache.add()
    rows = layers.forward(seq, prompt, cross, range(layers.num_layers))
    np.testing.assert_array_equal(rows[-1], plain)
    np.testing.assert_array_equal(model.step([seq], [262], cross)[0], after)


def test_long_form_reference_is_what_the_next_window_hears_again(transcriber) -> None:
    """Long-form lookup drafts from the previous window's tokens after its last finished segment (the
    next window starts at that segment's end, `_split`'s seek) and from nothing when the next window
    starts after the previous one."""
    tb = transcriber.config["timestamp_begin"]
    cut = [tb, 440, 2068, 13, tb + 50, tb + 50, 7586, 21831]  # the last segment unfinished
    pieces, seek = transcriber._split(cut, 0.0, 3000, 0)
    assert transcriber._unfinished(cut) == [tb + 50, 7586, 21831]
    assert seek == 50 * 2  # the tail starts where the next window does (2 mel frames per timestamp step)
    assert [p[2] for p in pieces][-1] == [tb, 440, 2068, 13, tb + 50]
    finished = [tb, 440, 2068, 13, tb + 50]  # ends on a single timestamp: the next window starts after it
    assert transcriber._unfinished(finished) == []
    assert transcriber._split(finished, 0.0, 3000, 0)[1] == 3000
    assert transcriber._unfinished([440, 2068, 13]) == []  # no timestamps: the next window starts after it


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lookup:k=0", "k must be"),
        ("lookup:ngram=9", "ngram must be"),
        ("lookup:skip=2", "unknown option"),
        ("self:k=4,skip=0-3", "draft layers"),
        ("self:k=0", "k must be"),
        ("model:x.edgert", "drafts by itself or by lookup"),
        ("self:k=2,exit=4", "exit must be"),
        ("self:k=2,depth=1", "unknown option"),
    ],
)
def test_speculative_bad_spec(transcriber, spec: str, message: str) -> None:
    from edgert.runtime.seq2seq_speculative import parse_seq2seq_speculative

    with pytest.raises(EdgertError, match=message):
        parse_seq2seq_speculative(spec, transcriber.model)


def test_exit_calibration_states_the_agreement_the_runtime_gives(whisper_artifact: Path, tmp_path: Path) -> None:
    """`edgert calibrate` on Whisper (4 espeak-ng sentences, the last 2 held out) stores one adapter per
    decoder exit; through the runtime's exit head (which loads them from the artifact) the held-out
    sentences give exactly the agreement the calibration stated, and --exit decodes with them."""
    import shutil

    import numpy as np

    from edgert.artifact.reader import open_artifact
    from edgert.families.shared.calibration import CALIBRATION_TEXT, calibration_sentences
    from edgert.families.whisper.calibrate import hidden_states, speak
    from edgert.families.whisper.transcriber import Transcriber
    from edgert.profile.calibrate import calibrate
    from edgert.runtime.seq2seq_speculative import DecoderLayers

    art = tmp_path / "w.edgert"
    shutil.copyfile(whisper_artifact, art)
    result = calibrate(art, sentences=4, policies=("static", "state"))
    stored = open_artifact(art).manifest["exits"]
    assert stored["layers"] == [1, 2, 3] and stored["calibration"] == result["calibration"]
    # The sweep decoded the held-out sentences at depths 1, 2, 3; a point is stored only where it was faster.
    assert set(stored["policies"]) ^ set(stored["refused"]) == {"static", "state"}
    for point in stored["policies"].values():  # a state point may run all 4 layers for some tokens
        assert 0 <= point["agreement"] <= 1 and 1 <= point["mean_layers"] <= 4 and point["speedup"] >= 1.0
    assert stored["probes"]["layers"] == [1, 2, 3]
    stated = result["calibration"]["held_out_agreement"]

    t = Transcriber(art)
    layers = DecoderLayers(t.model)
    assert sorted(layers.adapters) == [1, 2, 3]
    held_out = calibration_sentences(CALIBRATION_TEXT, 4)[2:]
    runs = [hidden_states(t, layers, speak(s, tmp_path / f"{i}.wav")) for i, s in enumerate(held_out)]
    states = np.concatenate([r[0] for r in runs], axis=1)
    top = np.concatenate([r[1] for r in runs])
    assert len(top) == result["calibration"]["held_out_tokens"]
    for e in (1, 2, 3):
        tops = np.argmax(layers.head(t.model.session.tensor(np.ascontiguousarray(states[e][None])), e), axis=-1)
        assert round(float(np.mean(tops == top)), 4) == stated[str(e)]["tuned_agreement"]
        plain = np.argmax(layers.head(t.model.session.tensor(np.ascontiguousarray(states[e][None]))), axis=-1)
        assert round(float(np.mean(plain == top)), 4) == stated[str(e)]["raw_agreement"]
    fast = Transcriber(art, exit="static:3")
    assert sorted(fast.early_exit.layers.adapters) == [1, 2, 3]
    fast.transcribe(tmp_path / "0.wav")
    assert fast.early_exit.mean_layers == 3.0 and len(fast.early_exit.depths) > 0
    never = Transcriber(art, exit="state:1.01")  # the probe cannot reach it: every token runs the whole decoder
    plain = Transcriber(art)
    assert never.transcribe(tmp_path / "0.wav").text == plain.transcribe(tmp_path / "0.wav").text
    assert set(never.early_exit.depths) == {4}
