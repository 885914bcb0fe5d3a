"""edgert installed as a wheel (`pip install .`, not editable) into a fresh virtual environment with
only its default dependencies: the commands work from the installed package and its data files,
and every recipe `edgert models` lists as installed compiles and runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import load_tool
from conftest import run_outside as _run


@pytest.mark.slow
def test_the_wheel_lists_targets_and_models_from_its_data_files(wheel_venv: Path, tmp_path: Path) -> None:
    edgert = str(wheel_venv / "bin" / "edgert")
    site = _run([str(wheel_venv / "bin" / "python"), "-c", "import edgert; print(edgert.__file__)"], tmp_path)
    assert str(wheel_venv) in site.stdout, site.stdout  # the installed copy, not this checkout
    targets = _run([edgert, "targets"], tmp_path)
    assert targets.returncode == 0, targets.stderr
    for name in ("host", "rpi5", "android-arm64", "x86-64-v3"):
        assert name in targets.stdout
    models = _run([edgert, "models"], tmp_path)
    assert models.returncode == 0, models.stderr
    assert "smollm2-135m" in models.stdout and "codec-speech16k" in models.stdout
    # Test-only packages are absent: the recipes below run on the default dependencies alone.
    probe = "import importlib.util as u; print([m for m in ('safetensors', 'torch', 'pytest') if u.find_spec(m)])"
    assert _run([str(wheel_venv / "bin" / "python"), "-c", probe], tmp_path).stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wheel_compiles_and_runs_a_tiny_model(wheel_venv: Path, tmp_path: Path) -> None:
    gguf = load_tool("make_tiny_gguf").write_tiny_llama(tmp_path / "tiny.gguf", "Q4_0")
    edgert = str(wheel_venv / "bin" / "edgert")
    proc = _run([edgert, "compile", str(gguf), "-o", str(tmp_path / "tiny.edgert")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = [edgert, "run", str(tmp_path / "tiny.edgert"), "--prompt", "Hi", "--max-tokens", "4", "--json"]
    run = _run(argv, tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["tokens"]) == 4


RECIPE_RUNS = [
    # Not the chat question "What is the capital of France?": its first token is a near tie ("L" and
    # "The" within 0.1 logit; llama.cpp itself starts "L'Étoile"), so int8 rounding decides the answer.
    ("smollm2-135m", ["run", "--prompt", "The capital of France is", "--raw", "--max-tokens", "4", "--json"]),
    ("codec-speech16k", ["codec", "roundtrip"]),
    ("whisper-tiny.en", ["transcribe"]),
    ("gemma3-270m", ["run", "--prompt", "Paris is", "--raw", "--max-tokens", "4", "--json"]),
]


# Recipes whose wheel compile reuses a library the checkout built (the fixture that holds it).
LIBRARY_CACHES = {"gemma3-270m": "gemma_library_cache"}
# Recipes whose build the session already makes with the installed wheel (the fixture that holds it).
WHEEL_BUILDS = {"smollm2-135m": "smollm_default_artifact"}


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "command"), RECIPE_RUNS)
def test_every_installed_recipe_compiles_and_runs_in_the_wheel(
    wheel_venv: Path, tmp_path: Path, recipe: str, command: list[str], request: pytest.FixtureRequest
) -> None:
    edgert = str(wheel_venv / "bin" / "edgert")
    models = _run([edgert, "models"], tmp_path).stdout
    line = next(line for line in models.splitlines() if recipe in line)
    assert "yes" in line.lower() or "installed" in line.lower(), line
    if recipe in WHEEL_BUILDS:
        # SmolLM2's default build is compiled by the wheel itself (`edgert compile smollm2-135m`, its
        # whole TVM build; conftest's `smollm_default_artifact`), once for this test and the checkout's.
        out = request.getfixturevalue(WHEEL_BUILDS[recipe])
    else:
        out = tmp_path / f"{recipe}.edgert"
        argv = [edgert, "compile", recipe, "-o", str(out)]
        libraries = None
        if recipe in LIBRARY_CACHES:
            # Gemma 3's TVM build is among the suite's longest (1.5-2.5 min): the wheel reuses the library
            # the checkout compiled for the same recipe and options, keyed by the module's structural hash
            # with the target and the TVM and edgert versions. The wheel still reads the model's packages,
            # builds the whole module, packs the weights and runs the artifact; its own TVM build runs for
            # the other recipes.
            libraries = request.getfixturevalue(LIBRARY_CACHES[recipe])
            argv += ["--library-cache", str(libraries)]
        proc = _run(argv, tmp_path, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if libraries is not None:  # a hit: the installed package built exactly the checkout's module
            assert len(list(libraries.glob("*.so"))) == 1, sorted(p.name for p in libraries.iterdir())
    audio = _speech(tmp_path)
    argv = [edgert, command[0], str(out), *command[1:]]
    if command[0] == "codec":
        argv = [edgert, "codec", "roundtrip", str(out), str(audio), "-o", str(tmp_path / "back.wav")]
    elif command[0] == "transcribe":
        argv = [edgert, "transcribe", str(out), str(audio)]
    run = _run(argv, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    if recipe == "smollm2-135m":
        assert "Paris" in json.loads(run.stdout)["text"]
    if recipe == "whisper-tiny.en":
        assert "sky" in run.stdout.lower()
    if recipe == "gemma3-270m":  # the chunk packages assembled in a fresh venv, the file compiled and run
        assert len(json.loads(run.stdout)["tokens"]) == 4


def test_the_install_test_covers_every_recipe() -> None:
    from edgert.paths import MODELS_DIR

    tested = {recipe for recipe, _ in RECIPE_RUNS}
    assert tested == {p.stem for p in MODELS_DIR.glob("*.toml")}


def _speech(folder: Path) -> Path:
    """A sentence spoken by espeak-ng at 16 kHz."""
    wav = folder / "speech.wav"
    if not wav.exists():
        proc = subprocess.run(
            ["espeak-ng", "-w", str(wav), "The sky is blue because air scatters blue light."],
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
    return wav
