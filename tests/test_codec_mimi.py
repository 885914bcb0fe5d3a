"""Mimi-architecture codecs: edgert against `transformers`' MimiModel (seeded random weights), whole and
streamed, through `edgert compile` and `edgert codec roundtrip`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

torch = pytest.importorskip("torch", reason="the Mimi reference needs torch (test extras)")

FRAME = 1920  # samples per code frame: 24 kHz at 12.5 Hz


def _torch_model(folder: Path):
    from safetensors.torch import load_file
    from transformers import MimiConfig, MimiModel

    raw = json.loads((folder / "config.json").read_text())
    config = MimiConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
    config._attn_implementation = "eager"
    model = MimiModel(config).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


def _speechlike(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 24000
    pitch = 140 + 40 * np.sin(2 * np.pi * 3 * t)
    voiced = 0.3 * np.sin(2 * np.pi * pitch * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 5 * t))
    return (voiced + 0.03 * rng.standard_normal(n)).astype(np.float32)


def _code_margin(model, audio: np.ndarray) -> float:
    """Smallest relative gap, over frames and stages of both RVQs, between the nearest and second-nearest code
    (identical codes can only be asked for where it exceeds float32 rounding; see test_codec.py)."""
    with torch.no_grad():
        latents = model.encoder(torch.from_numpy(audio).view(1, 1, -1)).latents
        margin = 1.0
        q = model.quantizer
        for rvq in (q.semantic_residual_vector_quantizer, q.acoustic_residual_vector_quantizer):
            residual = rvq.input_proj(latents)[0].T.double()
            for layer in rvq.layers:
                embed = layer.codebook.embed.double()
                dist = ((residual[:, None, :] - embed[None]) ** 2).sum(-1)
                two = dist.sort(1).values
                margin = min(margin, ((two[:, 1] - two[:, 0]) / two[:, 0].clamp(min=1e-12)).min().item())
                residual = residual - embed[dist.argmin(1)]
    return margin


def _reference(model, audio: np.ndarray, books: int) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(audio).view(1, 1, -1), num_quantizers=books).audio_codes
        out = model.decode(codes).audio_values[0, 0].numpy()
    return codes[0].numpy().T, out


@pytest.mark.slow
@pytest.mark.reference
def test_whole_signal_matches_transformers(tiny_mimi: Path, mimi_codec) -> None:
    """30 frames (2.4 s, 60 transformer steps through an 8-step window), all 8 codebooks and 3 of them:
    codes identical, audio within 1e-4."""
    model = _torch_model(tiny_mimi)
    audio = _speechlike(FRAME * 30, seed=1)
    assert _code_margin(model, audio) > 1e-4
    for books in (8, 3):
        want_codes, want_audio = _reference(model, audio, books)
        codes = mimi_codec.encode(audio, books)
        np.testing.assert_array_equal(codes, want_codes)
        assert len({tuple(row) for row in codes}) > 20  # the frames' codes differ: they carry information
        out = mimi_codec.decode(codes)
        assert out.shape == want_audio.shape == audio.shape
        assert np.abs(out - want_audio).max() < 1e-4, books
        assert np.abs(want_audio).max() > 0.05


@pytest.mark.slow
@pytest.mark.reference
def test_streamed_chunks_match_transformers(tiny_mimi: Path, mimi_codec) -> None:
    """Pushes of 700 to 9,000 samples (frames straddle them; a call gets 1, 2 or 5 frames, so the transformers
    take 2, 4 or 10 steps at a time through their 8-step windows) through the per-chunk entry points
    with explicit state: concatenated codes equal the whole-signal reference exactly, the audio within 1e-4."""
    model = _torch_model(tiny_mimi)
    audio = _speechlike(FRAME * 24, seed=3)
    assert _code_margin(model, audio) > 1e-4
    want_codes, want_audio = _reference(model, audio, 8)
    enc, dec = mimi_codec.encoder(), mimi_codec.decoder()
    codes, out, start, sizes = [], [], 0, [1500, 4100, 9000, 700]
    while start < len(audio):
        size = sizes[len(codes) % len(sizes)]
        last = start + size >= len(audio)
        c = enc.push(audio[start : start + size], final=last)
        codes.append(c)
        out.append(dec.push(c, final=last))
        start += size
    out.append(dec.flush())
    assert {len(c) for c in codes} == {0, 1, 2, 5}
    np.testing.assert_array_equal(np.concatenate(codes), want_codes)
    assert np.abs(np.concatenate(out) - want_audio).max() < 1e-4
    assert enc.stats.calls >= 8 and dec.stats.calls >= 8  # the state carried between every call
    # The explicit state ends with the transformer's stream position (24 frames = 48 transformer steps),
    # then the downsampling conv's look-back (2 steps x 32 channels).
    assert enc.state[-2 * 32 - 1] == 48.0
    assert (mimi_codec.frame_rate, mimi_codec.algorithmic_latency()) == (12.5, FRAME)


@pytest.mark.slow
def test_cli_roundtrip_and_refusals(tiny_mimi: Path, mimi_codec, tmp_path: Path) -> None:
    """`edgert codec roundtrip --stream` on the compiled Mimi equals the API's whole-signal round trip (up to
    16-bit rounding); unsupported configs are refused by name."""
    from edgert.errors import UnsupportedModelError
    from edgert.families.codec.stream import roundtrip
    from edgert.families.compile import compile_model
    from edgert.runtime.audio import load_wav, write_wav

    signal = _speechlike(FRAME * 10 + 700, seed=3)  # not a whole number of frames
    wav = tmp_path / "in.wav"
    write_wav(wav, signal, 24000)
    signal, _ = load_wav(wav)  # as the CLI reads it (16-bit)
    art = str(mimi_codec.artifact.path)
    proc = run_cli("codec", "roundtrip", art, str(wav), "-o", str(tmp_path / "s.wav"), "-b", "0.3", "--stream")
    assert proc.returncode == 0, proc.stderr
    report = " ".join(proc.stderr.split())
    assert "4 codebooks = 0.3 kbit/s at 12.5 frames/s" in report
    assert "algorithmic latency 1920 samples (80.0 ms)" in report
    streamed, rate = load_wav(tmp_path / "s.wav")
    _, whole, _, _ = roundtrip(mimi_codec, signal, codebooks=4)  # the API, whole signal in one call
    assert rate == 24000 and len(streamed) == len(whole) == FRAME * 10 + 700
    assert np.abs(streamed - whole).max() <= 2 / 32768 and np.abs(whole).max() > 0.02

    for change, message in (
        ({"pad_mode": "reflect"}, "pad_mode 'reflect'"),
        ({"num_key_value_heads": 2}, "grouped KV heads"),
        ({"upsample_groups": 5}, "upsample_groups 5"),
    ):
        bad = tmp_path / f"bad-{next(iter(change))}"
        shutil.copytree(tiny_mimi, bad)
        raw = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(UnsupportedModelError, match=message):
            compile_model(str(bad), target="host", output=tmp_path / "x.edgert")


def test_flat_checkpoint_layout_maps_the_same(tiny_mimi: Path) -> None:
    """Checkpoints saved before transformers split Mimi into encoder and decoder halves (``encoder.layers.*``,
    ``encoder_transformer.*``, ``upsample.*``) map onto the same parameters; a missing weight is named."""
    from edgert.errors import ModelFileError
    from edgert.families.codec.build import read_codec
    from edgert.families.codec.mimi import MimiCodec, mimi_weights

    cfg, tensors = read_codec(tiny_mimi)
    net = MimiCodec(cfg)
    split = mimi_weights(tensors, net)
    renames = {
        "encoder.encoder_seanet.": "encoder.",
        "encoder.encoder_transformer.": "encoder_transformer.",
        "encoder.downsample.": "downsample.",
        "decoder.upsample.": "upsample.",
        "decoder.decoder_transformer.": "decoder_transformer.",
        "decoder.decoder_seanet.": "decoder.",
    }
    flat = {}
    for key, value in tensors.items():
        for old, new in renames.items():
            key = key.replace(old, new) if key.startswith(old) else key
        flat[key] = value
    assert flat.keys() != tensors.keys()
    mapped = mimi_weights(flat, net)
    assert mapped.keys() == split.keys() == {name for name, _ in net.named_parameters()}
    assert all(np.array_equal(mapped[k], split[k]) for k in split)
    del flat["decoder_transformer.layers.1.mlp.fc2.weight"]
    with pytest.raises(ModelFileError, match=r"'decoder_transformer\.layers\.1\.mlp\.fc2\.weight' is missing"):
        mimi_weights(flat, net)
    del tensors["decoder.upsample.conv.weight"]
    with pytest.raises(ModelFileError, match=r"'decoder\.upsample\.conv\.weight' is missing"):
        mimi_weights(tensors, net)
