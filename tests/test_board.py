"""The emulated arm64 board: built once into the user's cache (about 1.5 minutes on a fresh machine),
started by `edgert board start`, reached over board://, rpc:// and serial://. An aarch64 build of
the tiny Llama must give the host build's greedy tokens on it; SmolLM2-135M too (first 8 tokens);
`edgert profile` must write a report that names the device and says "emulated". The project's speech
codec streams a round trip on it with the host build's codes; Whisper tiny.en, built with a 6 s
encoder window (`--audio-ctx 300`: the full 30 s window takes 13 minutes under qemu), transcribes on it
as the host build with the same window does."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_tool

import edgert
from edgert.deploy import board as board_mod
from edgert.deploy import parse_device
from edgert.errors import TargetError

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def board() -> Iterator[dict]:
    """The running emulated rpi5 board (started here, and stopped at the end, unless one ran already)."""
    was_running = board_mod.status()
    if was_running is None:
        proc = run_cli("board", "start", "--target", "rpi5")
        assert proc.returncode == 0, proc.stderr
        assert "board://127.0.0.1:" in proc.stdout and "rpc://" in proc.stdout and "serial:///dev/pts/" in proc.stdout
    state = board_mod.status()
    assert state is not None and state["target"] == "rpi5"
    yield state
    if was_running is None:
        assert board_mod.stop()
        assert board_mod.status() is None


@pytest.fixture(scope="module")
def host_tokens(tiny_host_artifact: Path) -> list[int]:
    return [t.id for t in edgert.load(tiny_host_artifact).generate(PROMPT, max_tokens=8)]


def test_board_status_and_identity(board: dict) -> None:
    res = run_cli("board", "status", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["pid"] == board["pid"]
    rootfs = Path(board["rootfs"])
    assert (rootfs / ".edgert-rootfs.json").is_file() and (rootfs / "usr/bin/python3.11").is_file()
    assert rootfs.is_relative_to(edgert.paths.cache_dir())
    with parse_device(board["uris"]["board"]) as dev:
        hello = dev.hello()
    assert hello["runtime"] == str(rootfs / board_mod.SRC / "edgert")  # the board's copy, not this checkout
    assert hello["arch"] == "aarch64" and hello["emulated"] is True
    assert {"neon", "dotprod"} <= set(hello["cpu_flags"]) and "sve" not in hello["cpu_flags"]  # qemu's Cortex-A76
    assert "rpi5" in hello["device"] and "emulated" in hello["device"]


@pytest.mark.parametrize("link", ["board", "rpc", "serial"])
def test_tiny_llama_on_the_board_gives_the_host_tokens(
    board: dict, link: str, tiny_rpi5_artifact: Path, host_tokens: list[int], tmp_path: Path
) -> None:
    copy = tmp_path / f"tiny-via-{link}.edgert"  # a name of its own: each link uploads
    shutil.copyfile(tiny_rpi5_artifact, copy)
    with parse_device(board["uris"][link]) as dev:
        reply = dev.deploy(copy)
        out = dev.run(copy.name, prompt=PROMPT, max_tokens=8, raw=True)
        assert dev.link == link
    assert reply["size"] == copy.stat().st_size
    assert out["tokens"] == host_tokens
    assert (Path(board["rootfs"]) / board_mod.AGENT_ROOT / copy.name).read_bytes() == copy.read_bytes()


def test_the_board_refuses_a_host_artifact(board: dict, tiny_host_artifact: Path) -> None:
    with parse_device(board["uris"]["board"]) as dev:
        with pytest.raises(TargetError, match=r"compiled for target 'host' \(x86_64.*is aarch64"):
            dev.deploy(tiny_host_artifact)


def test_cli_run_on_the_board_and_profile_report(
    board: dict, tiny_rpi5_artifact: Path, host_tokens: list[int], tmp_path: Path
) -> None:
    uri = board["uris"]["board"]
    res = run_cli("run", str(tiny_rpi5_artifact), "--device", uri, "--prompt", PROMPT, "-n", "8", "--raw", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["tokens"] == host_tokens and out["device"]["link"] == "board"

    report = tmp_path / "board.html"
    res = run_cli(
        "profile", str(tiny_rpi5_artifact), "--device", uri, "--runs", "2", "-n", "6", "--report", str(report)
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(report.with_suffix(".json").read_text())
    assert "emulated" in data["title"] and board["name"] in data["title"]
    assert data["device"]["emulated"] and data["target"]["name"] == "rpi5" and data["link"]["kind"] == "board"
    assert len(data["decode_step_ms"]) == 2 and all(len(r) == 6 for r in data["decode_step_ms"])
    assert 0 < data["decode_ms"]["p50"] <= data["decode_ms"]["p90"] <= data["decode_ms"]["p99"]
    assert data["load_seconds"] > 0 and data["peak_rss_mb"] > 0 and data["prefill_ms"]["p50"] > 0
    assert any(op["operator"].startswith(("packed_matmul", "quant_matmul")) for op in data["operators"][:3])
    html = report.read_text()
    assert "<title>edgert profile: tiny on emulated rpi5" in html and "emulated" in html
    assert f"p50 {data['decode_ms']['p50']} ms" in html and uri in html
    for kind in ("timeline", "histogram", "operators"):
        png = tmp_path / f"board.{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f'src="board.{kind}.png"' in html
    rows = report.with_suffix(".csv").read_text().splitlines()
    assert rows[0] == "kind,run,step_or_operator,ms,calls_per_token"
    assert sum(r.startswith("decode_token,") for r in rows) == 12


def test_profile_script_over_the_same_api(board: dict, tiny_rpi5_artifact: Path, tmp_path: Path) -> None:
    report = tmp_path / "script.html"
    args = [str(tiny_rpi5_artifact), "--device", board["uris"]["board"], "--runs", "1", "--max-tokens", "4"]
    proc = run_tool("profile_device", *args, "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    paths = json.loads(proc.stdout)
    assert paths["html"] == str(report) and Path(paths["operators"]).is_file()
    assert json.loads(report.with_suffix(".json").read_text())["runs"] == 1


def test_smollm2_for_rpi5_on_the_board_matches_the_host_build(
    board: dict, smollm: object, smollm_rpi5_artifact: Path
) -> None:
    # Under qemu every SmolLM2 token costs seconds (each prompt token as much as a generated one), so a
    # two-token raw prompt; the 8 generated tokens are what the issue asks to match.
    prompt = "Paris is"
    want = [t.id for t in smollm.generate(prompt, max_tokens=8)]  # type: ignore[attr-defined]
    assert len(want) == 8
    with parse_device(board["uris"]["board"]) as dev:
        dev.deploy(smollm_rpi5_artifact)
        got = dev.run(smollm_rpi5_artifact.name, prompt=prompt, max_tokens=8, raw=True)
    assert got["stats"]["prompt_tokens"] == 2
    assert got["tokens"] == want, got["text"]


@pytest.fixture(scope="module")
def tiny_gemma_builds(tiny_gemma_gguf: Path, tiny_gemma_host_artifact: Path, tmp_path_factory) -> dict[str, Path]:
    """A tiny random Gemma 3 (five sliding-window layers of window 4 and a global one; Q8_0),
    compiled for this machine (shared with the GPU tests) and for rpi5."""
    rpi5 = tmp_path_factory.mktemp("tiny-gemma") / "tiny-gemma3-rpi5.edgert"
    proc = run_cli("compile", str(tiny_gemma_gguf), "--target", "rpi5", "-o", str(rpi5))
    assert proc.returncode == 0, proc.stderr
    return {"host": tiny_gemma_host_artifact, "rpi5": rpi5}


def test_tiny_gemma3_window_freed_or_masked_gives_the_same_logits(tiny_gemma_builds: dict[str, Path]) -> None:
    # Two ways through the local layers' cache: TVM's masking kernels in chunks shorter than the
    # window, or a sliding cache (pages freed) stepping one token at a time past it.
    from edgert.runtime import open_artifact
    from edgert.runtime.generator import Generator

    art = open_artifact(tiny_gemma_builds["host"])
    masked, freed = Generator(art), Generator(art, free_window=True)
    ids = masked.tokenizer.encode("Paris is a city of light and of the river Seine which runs")
    want = masked.score(ids)
    assert np.isfinite(want).all()  # TVM's masking prefill kernel read uninitialized state (NaN at random)
    np.testing.assert_allclose(freed.score(ids), want, atol=1e-3, rtol=0)
    assert freed.cache.pages_in_use()[1] == 1 and masked.cache.pages_in_use()[1] == 1  # 16-position pages


def test_tiny_gemma3_decode_steps_give_the_chunks_logits_past_the_window(tiny_gemma_builds: dict[str, Path]) -> None:
    # edgert's kernels for the masking cache (compiler.passes.attention): one token at a time (the
    # window decode kernel) and chunks of window - 1 (the window prefill kernel over the pages,
    # the ragged one among the chunk) give the same logits at every position of 14 (window 4).
    from edgert.runtime import open_artifact
    from edgert.runtime.generator import Generator

    model = Generator(open_artifact(tiny_gemma_builds["host"]))
    ids = model.tokenizer.encode("Paris is a city of light and of the river Seine which runs")
    chunks = model.score(ids)
    model.reset()
    steps = np.stack([model.step([t]) for t in ids])
    assert len(ids) > 3 * 4 and np.isfinite(chunks).all()
    np.testing.assert_allclose(steps, chunks, atol=1e-4, rtol=0)


def test_tiny_gemma3_for_rpi5_on_the_board_gives_the_host_tokens(
    board: dict, tiny_gemma_builds: dict[str, Path]
) -> None:
    # Gemma's own blocks on aarch64 (q/k norms, per-layer RoPE bases, GeGLU, two KV caches, the
    # sliding-window kernels): a 5-token prompt and 8 tokens reach past the window of 4.
    prompt = "Paris is a city of"
    host = edgert.load(tiny_gemma_builds["host"])
    want = [t.id for t in host.generate(prompt, max_tokens=8)]
    assert host.stats.prompt_tokens == 5 and len(want) == 8
    with parse_device(board["uris"]["board"]) as dev:
        dev.deploy(tiny_gemma_builds["rpi5"])
        got = dev.run(tiny_gemma_builds["rpi5"].name, prompt=prompt, max_tokens=8, raw=True)
    assert got["tokens"] == want, got["text"]


# -- speech and codecs on the board (issues 6 and 7) -------------------------------------------------


@pytest.fixture(scope="session")
def codec_rpi5_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's speech codec (models/codec-speech16k) cross-compiled for rpi5."""
    out = tmp_path_factory.mktemp("codec-rpi5") / "codec-rpi5.edgert"
    proc = run_cli("compile", "codec-speech16k", "--target", "rpi5", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _espeak(text: str, path: Path) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: tools/setup.sh --test installs it")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(path), text], check=True, capture_output=True)
    return path


def test_codec_streams_on_the_board_as_on_the_host(
    board: dict, speech_artifact: Path, codec_rpi5_artifact: Path, tmp_path: Path
) -> None:
    import numpy as np

    from edgert.families.codec.stream import load_codec, roundtrip
    from edgert.runtime.audio import load_wav, resample

    host_art, rpi5_art = speech_artifact, codec_rpi5_artifact  # the host build is test_codec.py's too
    wav = _espeak("Please call Stella.", tmp_path / "stella.wav")
    audio, rate = load_wav(wav)
    audio = resample(audio, rate, 16000)
    host = load_codec(host_art)
    books = host.codebooks_for(3.2)
    want_codes, want_audio, _, _ = roundtrip(host, audio, books, stream=True, chunk_samples=1280)  # 80 ms chunks
    with parse_device(board["uris"]["board"]) as dev:
        dev.deploy(rpi5_art)
        facts, codes, out = dev.codec_roundtrip(rpi5_art.name, audio, stream=True, chunk_ms=80, bandwidth=3.2)
    assert facts["stream"] and facts["codebooks"] == books and facts["encode"]["calls"] >= 10
    np.testing.assert_array_equal(codes, want_codes)
    assert len(out) == len(want_audio) == len(audio)
    assert np.abs(out - want_audio).max() < 1e-4 and np.abs(want_audio).max() > 0.05


def test_whisper_transcribes_on_the_board_as_on_the_host(
    board: dict, whisper_short_artifact: Path, tmp_path: Path
) -> None:
    from edgert.families.whisper.transcriber import Transcriber
    from edgert.runtime.audio import read_wav

    wav = _espeak("Please call Stella and ask her to bring these things with her from the store.", tmp_path / "s.wav")
    want = Transcriber(whisper_short_artifact).transcribe(read_wav(wav), beam_size=1)  # 5.4 s: one 6 s window
    art = tmp_path / "whisper-tiny.en-rpi5.edgert"
    proc = run_cli("compile", "whisper-tiny.en", "--target", "rpi5", "--audio-ctx", "300", "-o", str(art))
    assert proc.returncode == 0, proc.stderr
    uri = board["uris"]["board"]
    res = run_cli("transcribe", str(art), str(wav), "--beam", "1", "--json", "--device", uri)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert "resampled 22050 Hz -> 16000 Hz" in res.stderr
    assert got["device"]["link"] == "board" and "emulated" in got["device"]["name"]
    assert [s["tokens"] for s in got["segments"]] == [s.tokens for s in want.segments]
    assert got["text"] == want.text and "Stella" in got["text"]
