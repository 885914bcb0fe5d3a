"""The `edgert` command, run as a user would (a fresh process each time), and atomic artifact writes."""

from __future__ import annotations

import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli

from edgert.artifact.writer import check_output_path, write_artifact
from edgert.deploy import parse_device
from edgert.errors import EdgertError, OutputPathError
from edgert.runtime import open_artifact

QUESTION = "What is the capital of France?"


def assert_clean_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, the message on stderr, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


# -- listing ---------------------------------------------------------------------------------
def test_targets_lists_the_devices() -> None:
    res = run_cli("targets")
    assert res.returncode == 0, res.stderr
    for name in ("host", "rpi4", "rpi5", "android-arm64"):
        assert re.search(rf"\b{re.escape(name)}\b", res.stdout), (name, res.stdout)
    for word in ("aarch64", "detect", "ssh", "adb", "local"):
        assert word in res.stdout, word
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in res.stdout.splitlines() if "│" in line}
    assert rows["rpi5"] == "cpu" and rows["host-opencl"].startswith("gpu") and rows["rk3588-mali"].startswith("gpu")
    assert rows["ethos-u55-128"].startswith("npu") and rows["android-nnapi"].startswith("npu")


def test_models_lists_smollm() -> None:
    res = run_cli("models")
    assert res.returncode == 0, res.stderr
    assert "smollm2-135m" in res.stdout
    assert "llama" in res.stdout


# -- run, chat, bench ----------------------------------------------------------------------------
@pytest.mark.slow
def test_run_streams_text_and_reports_speed(smollm_artifact: Path) -> None:
    res = run_cli("run", str(smollm_artifact), "--prompt", QUESTION, "--max-tokens", "16")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert "Paris" not in res.stderr
    assert re.search(r"generated at \d+(\.\d+)? tok/s", res.stderr), res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_run_json(smollm_artifact: Path) -> None:
    res = run_cli("run", str(smollm_artifact), "--prompt", QUESTION, "--max-tokens", "16", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["prompt"] == QUESTION
    assert "Paris" in out["text"]
    assert out["tokens"] and all(isinstance(t, int) for t in out["tokens"])
    stats = out["stats"]
    assert stats["generated_tokens"] == len(out["tokens"]) <= 16
    assert stats["decode_tokens_per_second"] > 0
    assert stats["prompt_tokens"] > 0
    assert stats["stop_reason"] in ("stop_token", "max_tokens")


@pytest.mark.slow
def test_chat_over_stdin_keeps_the_cache(smollm_artifact: Path) -> None:
    res = run_cli("chat", str(smollm_artifact), "--max-tokens", "32", input=f"{QUESTION}\nAnd of Germany?\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout and "Berlin" in res.stdout
    assert res.stdout.index("Paris") < res.stdout.index("Berlin")
    cached = [int(n) for n in re.findall(r"\((\d+) cached\)", res.stderr)]
    assert len(cached) == 2, res.stderr
    assert cached[1] > 0


@pytest.mark.slow
def test_bench_json(smollm_artifact: Path) -> None:
    res = run_cli(
        "bench", str(smollm_artifact), "--json", "--repeats", "2", "--gen-tokens", "8", "--prompt-tokens", "16"
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("load_seconds", "prefill_tokens_per_second", "decode_tokens_per_second", "peak_rss_mb"):
        assert out[key] > 0, key
    assert out["repeats"] == 2 and len(out["decode_tokens_per_second_runs"]) == 2
    assert out["prompt_tokens"] == 16 and out["gen_tokens"] == 8
    assert out["target"] == "host"


# -- errors ------------------------------------------------------------------------------------
def test_compile_unknown_target() -> None:
    res = run_cli("compile", "smollm2-135m", "--target", "nosuch")
    from edgert.paths import TARGETS_DIR

    known = ", ".join(sorted(p.stem for p in TARGETS_DIR.glob("*.toml")))
    assert {"host", "rpi5", "host-opencl", "ethos-u55-128"} <= set(known.split(", "))
    assert_clean_error(res, "'nosuch'", known)


def test_compile_unknown_model(tmp_path: Path) -> None:
    res = run_cli("compile", "no-such-model", "-o", str(tmp_path / "x.edgert"))
    assert_clean_error(res, "'no-such-model'", "smollm2-135m")
    assert list(tmp_path.iterdir()) == []


def test_compile_into_missing_folder_leaves_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    res = run_cli("compile", "smollm2-135m", "-o", str(missing / "x.edgert"))
    assert_clean_error(res, f"the folder {missing} does not exist")
    assert list(tmp_path.iterdir()) == []
    res = run_cli("compile", "smollm2-135m", "-o", "/no/such/dir/x.edgert")
    assert_clean_error(res, "/no/such/dir")
    assert not Path("/no/such/dir").exists()


def test_compile_over_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"jpeg")
    res = run_cli("compile", "smollm2-135m", "-o", str(target))
    assert_clean_error(res, "holds something else")
    assert [p.name for p in target.iterdir()] == ["cat.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--top-p", "0", "top_p must be in (0, 1]"),
        ("--top-p", "1.5", "top_p"),
        ("--top-k", "-1", "top_k must be >= 0"),
        ("--repetition-penalty", "0", "repetition_penalty must be > 0"),
        ("--max-tokens", "0", "max_tokens"),
    ],
)
def test_run_rejects_bad_sampling_values(smollm_artifact: Path, option: str, value: str, message: str) -> None:
    res = run_cli("run", str(smollm_artifact), "--prompt", QUESTION, option, value)
    assert_clean_error(res, message)
    assert res.stdout.strip() == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "x.edgert", "--top-p", "lots"), "'--top-p'"),
        (("run",), "Missing argument 'artifact'"),
        (("run", "x.edgert", "--bogus"), "No such option: --bogus"),
        (("nosuchcommand",), "No such command"),
    ],
)
def test_usage_errors_are_reported_without_traceback(args: tuple[str, ...], message: str) -> None:
    res = run_cli(*args)
    assert_clean_error(res, "Error:", message)
    assert res.stdout == ""


def test_unknown_device_is_refused_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path))
    assert parse_device("local").root == tmp_path / "deployed"
    for uri, scheme in [("nosuch", "nosuch"), ("ftp://pi@raspberrypi.local", "ftp")]:
        with pytest.raises(EdgertError, match=rf"device link '{scheme}' is not available.*local, board, ssh"):
            parse_device(uri)


# -- atomic artifact writes ----------------------------------------------------------------------
MANIFEST = {"name": "tiny", "family": "llama", "target": {"name": "host", "arch": "none", "cpu_flags": []}}


def _stage(folder: Path, payload: bytes) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    files = {"model.so": payload * 3, "weights.safetensors": payload * 100, "tokenizer.json": b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@pytest.mark.parametrize("as_dir", [False, True], ids=["zip", "folder"])
def test_write_artifact_replaces_an_existing_one(tmp_path: Path, as_dir: bool) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "tiny.edgert"
    write_artifact(out, MANIFEST, _stage(tmp_path / "a", b"first"), as_dir=as_dir)
    assert open_artifact(out, check_host=False).read_bytes("model.so") == b"first" * 3
    write_artifact(out, MANIFEST, _stage(tmp_path / "b", b"second"), as_dir=as_dir)
    art = open_artifact(out, check_host=False)  # verifies every member's hash
    assert art.read_bytes("model.so") == b"second" * 3
    assert art.read_bytes("weights.safetensors") == b"second" * 100
    assert out.is_dir() == as_dir
    assert [p.name for p in out_dir.iterdir()] == ["tiny.edgert"]  # no temporary or old copies left


def test_write_artifact_failing_midway_keeps_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "tiny.edgert"
    write_artifact(out, MANIFEST, _stage(tmp_path / "a", b"first"))
    before = out.read_bytes()

    calls = []
    original_open = zipfile.ZipFile.open

    def failing_open(self: zipfile.ZipFile, name: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        arcname = getattr(name, "filename", name)
        if mode == "w":
            calls.append(arcname)
            if arcname == "weights.safetensors":  # the manifest and the library are in, then the disk fills up
                raise OSError(28, "No space left on device")
        return original_open(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        write_artifact(out, MANIFEST, _stage(tmp_path / "b", b"second"))
    assert "model.so" in calls and calls[-1] == "weights.safetensors"
    assert out.read_bytes() == before
    assert open_artifact(out, check_host=False).read_bytes("model.so") == b"first" * 3
    assert [p.name for p in out_dir.iterdir()] == ["tiny.edgert"]


def test_check_output_path(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "x.edgert") == tmp_path / "x.edgert"
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "x.edgert")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("a")
    with pytest.raises(OutputPathError, match="holds something else"):
        check_output_path(tmp_path / "stuff")


# -- inspect and calibrate on a hand-made artifact (no compile) ------------------------------------
def _tiny_with_sections(tmp_path: Path, **sections: object) -> Path:
    manifest = {
        **MANIFEST,
        "target": {"name": "host", "arch": "none", "triple": "none", "cpu": "generic", "cpu_flags": []},
        "entry_points": {"main": {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}], "outputs": []}},
        "weights": {"dtype": "float32", "order": ["a", "b"]},
        "created_by": "edgert test",
        "tvm_version": "none",
        **sections,
    }
    out = tmp_path / "tiny.edgert"
    write_artifact(out, manifest, _stage(tmp_path / "staged", b"x"))
    return out


def test_inspect_prints_every_section_and_the_fallback_kernels(tmp_path: Path) -> None:
    art = _tiny_with_sections(
        tmp_path,
        kv_cache={"kind": "paged", "context_length": 64, "page_size": 16, "prefill_chunk_size": 32},
        codec={"sample_rate": 16000},
        kernels={"fallback": ["add", "fused_gelu"], "total": 7},
        exits={"layers": [1, 2], "policies": {"confidence": {"threshold": 0.9}}},
    )
    res = run_cli("inspect", str(art))
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for fragment in (
        "kv cache paged, context 64, page 16, prefill chunk 32",
        "codec sample_rate 16000",
        "kernels 7, 2 on TVM's default schedule: add, fused_gelu",
        "exits layers 1, 2; calibrated confidence:0.9",
        "weights dtype float32, 2 tensors",
        "x float32[1, 4]",
        "all members match their sha256",
    ):
        assert fragment in text, (fragment, res.stdout)


def test_calibrate_refuses_what_the_family_cannot_take(tmp_path: Path) -> None:
    art = _tiny_with_sections(tmp_path)  # a 'llama' manifest: its calibration does not speak
    assert_clean_error(run_cli("calibrate", str(art), "--sentences", "4"), "--sentences applies to calibrating whisper")
    codec = tmp_path / "codec"
    codec.mkdir()
    other = _tiny_with_sections(codec, family="codec")
    assert_clean_error(run_cli("calibrate", str(other)), "codec models have no early-exit calibration")
