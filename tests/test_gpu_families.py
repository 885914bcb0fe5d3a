"""Model families compiled for an OpenCL GPU target and run end to end on the OpenCL device.

The device here is PoCL's CPU emulation (pocl-opencl-icd); timings from it say nothing about a
phone's GPU, so these tests compare results with the host CPU build, never speeds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool, run_cli

from edgert.errors import EdgertError, NoDeviceError, TargetError
from edgert.runtime import opencl


@pytest.fixture(scope="module")
def opencl_device() -> str:
    """The OpenCL device's name (PoCL, which tools/setup.sh installs with the library), or a failure
    saying why there is none (library not built, no device)."""
    try:
        return opencl.find_device()
    except (NoDeviceError, EdgertError) as exc:
        pytest.fail(str(exc))


def _compile(model: Path | str, target: str, out: Path, *extra: str) -> Path:
    proc = run_cli("compile", str(model), "--target", target, "-o", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def tiny_gpu_artifact(tiny_opencl_artifact: Path, opencl_device: str) -> Path:
    return tiny_opencl_artifact


@pytest.fixture(scope="module")
def tiny_cpu_artifact(tiny_host_artifact: Path) -> Path:
    return tiny_host_artifact  # the same CLI build of the same GGUF: compiled once per run (conftest)


def test_tiny_llama_on_opencl_matches_the_cpu_build(tiny_gpu_artifact: Path, tiny_cpu_artifact: Path) -> None:
    import edgert
    from edgert.artifact import open_artifact

    manifest = open_artifact(tiny_gpu_artifact).manifest
    assert manifest["target"]["kind"] == "gpu" and manifest["target"]["device"] == "opencl"
    assert manifest["weights"]["layout"] == "gpu-rows-uint32"
    gpu, cpu = edgert.load(tiny_gpu_artifact), edgert.load(tiny_cpu_artifact)
    assert gpu.session.on_gpu and not cpu.session.on_gpu
    ids = gpu.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    # Every position's logits (prefill kernels), then the decode kernels step by step.
    np.testing.assert_allclose(gpu.score(ids), cpu.score(ids), atol=1e-4, rtol=1e-4)
    for prompt in ("Hello there", "Once upon a time"):
        want = [t.id for t in cpu.generate(prompt, max_tokens=12)]
        got = [t.id for t in gpu.generate(prompt, max_tokens=12)]
        assert got == want
    gpu.reset()
    cpu.reset()
    for token in ids[:6]:
        np.testing.assert_allclose(gpu.step([token]), cpu.step([token]), atol=1e-4, rtol=1e-4)
    # Tokens appended after cached ones (a second prompt chunk, a chat turn reusing its prefix, a
    # verify pass): attention over the cached pages merged with the new tokens' own (`merge_state_kernel`).
    for model in (gpu, cpu):
        model.reset()
        model.prefill(ids[:5])
    np.testing.assert_allclose(gpu.step(ids[5:]), cpu.step(ids[5:]), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gpu.prefill([*ids[:3], 7, 8]), cpu.prefill([*ids[:3], 7, 8]), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        gpu.step([1, 2], all_logits=True), cpu.step([1, 2], all_logits=True), atol=1e-4, rtol=1e-4
    )


def test_tiny_gemma3_on_opencl_matches_the_cpu_build(
    tiny_gemma_gguf: Path, tiny_gemma_host_artifact: Path, opencl_device: str, tmp_path: Path
) -> None:
    # Steps of several tokens: TVM's tiled prefill kernels wrote zeros at head size 32 (the config
    # in `families.shared.kv_cache._prefill_tiles`), and the local cache's merge kernel, named
    # with its cache's suffix, kept TVM's racy one (`compiler.gpu.race_free_merge_state`).
    import edgert

    gpu = edgert.load(_compile(tiny_gemma_gguf, "host-opencl", tmp_path / "tiny-gemma3-gpu.edgert"))
    cpu = edgert.load(tiny_gemma_host_artifact)
    ids = gpu.tokenizer.encode("Paris is a city of light and of the river Seine which runs")
    assert len(ids) > 3 * 4  # chunks of window - 1 = 3 over cached pages, past the window of 4
    np.testing.assert_allclose(gpu.score(ids), cpu.score(ids), atol=1e-4, rtol=1e-4)
    for model in (gpu, cpu):
        model.reset()
    steps = [gpu.step([t]) for t in ids[:6]]
    np.testing.assert_allclose(steps, [cpu.step([t]) for t in ids[:6]], atol=1e-4, rtol=1e-4)
    want = [t.id for t in cpu.generate("Paris is", max_tokens=8)]
    assert [t.id for t in gpu.generate("Paris is", max_tokens=8)] == want


@pytest.mark.slow
def test_mali_build_keeps_float16_scales_and_cross_compiles(tiny_gguf_file: Path, tmp_path: Path) -> None:
    """Mali and Adreno have cl_khr_fp16: scales stay float16 there (PoCL's generic device gets float32)."""
    import shutil
    import zipfile

    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("aarch64-linux-gnu-g++ is not installed (tools/setup.sh --test installs g++-aarch64-linux-gnu)")
    from edgert.artifact.tensorfile import read_tensors

    art = _compile(tiny_gguf_file, "rk3588-mali", tmp_path / "mali.edgert")
    with zipfile.ZipFile(art) as z:
        manifest = json.loads(z.read("manifest.json"))
        assert z.read("model.so")[:4] == b"\x7fELF"
        (tmp_path / "w.safetensors").write_bytes(z.read("weights.safetensors"))
    assert manifest["target"] | {"kind": "gpu", "gpu": "mali", "fp16": True} == manifest["target"]
    tensors = read_tensors(tmp_path / "w.safetensors")
    assert str(tensors["lm_head.scale"].dtype) == "float16" and str(tensors["lm_head.qweight"].dtype) == "uint32"


def test_run_command_answers_on_opencl_and_device_kind_is_checked(
    tiny_gpu_artifact: Path, tiny_cpu_artifact: Path, opencl_device: str
) -> None:
    proc = run_cli("run", str(tiny_gpu_artifact), "--prompt", "Hello", "-n", "4", "--raw")
    assert proc.returncode == 0, proc.stderr
    assert "OpenCL" in proc.stderr and opencl_device.split(" | ")[0] in proc.stderr
    proc = run_cli("run", str(tiny_gpu_artifact), "--prompt", "Hello", "-n", "4", "--raw", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) == 4
    proc = run_cli("run", str(tiny_gpu_artifact), "--device-kind", "cpu", "--prompt", "Hello", "-n", "4")
    assert proc.returncode != 0 and "runs its kernels on the GPU" in proc.stderr and "--target host" in proc.stderr
    proc = run_cli("run", str(tiny_cpu_artifact), "--device-kind", "gpu", "--prompt", "Hello", "-n", "4")
    assert proc.returncode != 0 and "--target host-opencl" in proc.stderr


def test_gpu_artifact_without_an_opencl_device_is_refused(tiny_gpu_artifact: Path, tmp_path: Path) -> None:
    """No OpenCL driver (an empty ICD folder): one clear line, no traceback."""
    vendors = tmp_path / "vendors"
    vendors.mkdir()
    env = {"OCL_ICD_VENDORS": str(vendors), "OPENCL_VENDOR_PATH": str(vendors)}
    proc = run_cli("run", str(tiny_gpu_artifact), "--prompt", "Hello", "-n", "2", env=env)
    assert proc.returncode != 0
    assert "no OpenCL device found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def onnx_graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("onnx")
    return load_tool("make_tiny_onnx").write(tmp_path_factory.mktemp("onnx"))


@pytest.mark.parametrize("name", ["dense", "attention", "layernorm", "conv1d"])
def test_onnx_graphs_on_opencl_match_the_cpu_build(
    onnx_graphs: dict[str, Path], tmp_path: Path, name: str, opencl_device: str
) -> None:
    import edgert

    gpu = edgert.load(edgert.compile(str(onnx_graphs[name]), target="host-opencl", output=tmp_path / "g.edgert").path)
    cpu = edgert.load(edgert.compile(str(onnx_graphs[name]), target="host", output=tmp_path / "c.edgert").path)
    assert gpu.session.on_gpu and gpu.artifact.target["kind"] == "gpu"
    rng = np.random.default_rng(1)
    for rows in (1, 5):  # symbolic dims: one row, then several; the second call refills the input buffers
        feeds = {}
        for spec in cpu.inputs:
            shape = [d if isinstance(d, int) else rows for d in spec["shape"]]
            feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
        got, want = gpu(feeds), cpu(feeds)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=1e-4)


def test_tflite_graph_on_opencl_matches_the_cpu_build(tmp_path: Path, opencl_device: str) -> None:
    import edgert

    pytest.importorskip("flatbuffers")
    path = tmp_path / "tiny.tflite"
    path.write_bytes(load_tool("make_tiny_tflite").build())
    gpu = edgert.load(edgert.compile(str(path), target="host-opencl", output=tmp_path / "g.edgert").path)
    cpu = edgert.load(edgert.compile(str(path), target="host", output=tmp_path / "c.edgert").path)
    rng = np.random.default_rng(0)
    feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in cpu.inputs}
    got, want = gpu(feeds), cpu(feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=1e-4)


def test_graph_run_command_on_opencl(onnx_graphs: dict[str, Path], tmp_path: Path, opencl_device: str) -> None:
    art = _compile(onnx_graphs["dense"], "host-opencl", tmp_path / "dense.edgert")
    x = np.random.default_rng(0).standard_normal((2, 3, 37)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    proc = run_cli("run", str(art), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"))
    assert proc.returncode == 0, proc.stderr
    import edgert

    cpu = edgert.load(_compile(onnx_graphs["dense"], "host", tmp_path / "dense-cpu.edgert"))
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], cpu(x=x)["y"], atol=1e-4, rtol=1e-4)
    proc = run_cli(
        "compile",
        str(onnx_graphs["dense"]),
        "--target",
        "host-opencl",
        "--quant",
        "q8",
        "-o",
        str(tmp_path / "q.edgert"),
    )
    assert proc.returncode != 0 and "GPU target take f32 weights only" in proc.stderr


def test_emulated_board_refuses_gpu_artifacts_and_targets(tiny_gpu_artifact: Path, tmp_path: Path) -> None:
    import threading

    from edgert.deploy import board, parse_device
    from edgert.deploy.agent import Agent, tcp_server

    with pytest.raises(board.BoardError, match=r"the emulated board has no GPU .*'rk3588-mali' runs kernels on OpenCL"):
        board.start("rk3588-mali")
    agent = Agent(tmp_path / "device", name="emulated-test", emulated=True)
    server = tcp_server(agent, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with parse_device(f"board://127.0.0.1:{server.server_address[1]}") as dev:
            with pytest.raises(EdgertError, match=r"emulated board has no GPU: 'tiny-gpu\.edgert' runs"):
                dev.deploy(tiny_gpu_artifact)
        assert not (agent.root / tiny_gpu_artifact.name).exists()
    finally:
        server.shutdown()
        server.server_close()


def test_kernel_table_of_the_decode_step(tiny_gguf_file: Path, tiny_gpu_artifact: Path) -> None:
    """tools/gpu_kernel_table.py: every decode kernel with its work-group and bytes read; weights dominate."""
    result = load_tool("gpu_kernel_table").table(str(tiny_gguf_file), tiny_gpu_artifact, 20, "host-opencl", None)
    kernels = {k["kernel"]: k for k in result["kernels"]}
    head = max(
        (k for k in kernels.values() if k["kernel"].startswith("dequantize_NT_matmul")), key=lambda k: k["weights"]
    )
    assert head["calls"] == 1 and head["work_group"].split("x")[0].isdigit()
    assert kernels["batch_decode_paged_kv_kernel"]["calls"] == 2 and kernels["batch_decode_paged_kv_kernel"]["kv"] > 0
    assert 0.9 < result["weight_share_of_bytes_read"] < 1


def _module_kernels(artifact: Path) -> set[str]:
    """The OpenCL kernels in a GPU artifact's library, read from the OpenCL C source it embeds."""
    import re
    import zipfile

    with zipfile.ZipFile(artifact) as z:
        return {k.decode() for k in re.findall(rb"__kernel void (\w+)\(", z.read("model.so"))}


def test_profile_on_opencl_lists_kernels_device_memory_and_the_pocl_caveat(
    tiny_gpu_artifact: Path, tmp_path: Path, opencl_device: str
) -> None:
    """`edgert profile` on a GPU artifact: per-kernel device times from OpenCL events, sorted, with their
    share; the device memory; and, on PoCL, that the device is a CPU emulation."""
    from edgert.artifact import open_artifact

    report = tmp_path / "p.html"
    proc = run_cli("profile", str(tiny_gpu_artifact), "--runs", "1", "-n", "3", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "a CPU emulation of OpenCL" in text and "say nothing about a phone's or board's GPU" in text
    gpu = json.loads(report.with_suffix(".json").read_text())["gpu"]
    assert gpu["device"]["cpu_emulation"] and gpu["device"]["platform"] == "Portable Computing Language"
    kernels = gpu["kernels"]
    names = [k["kernel"] for k in kernels]
    assert names and set(names) <= _module_kernels(tiny_gpu_artifact) and len(set(names)) == len(names)
    assert all(k["count"] > 0 and k["total_ms"] >= 0 for k in kernels)
    assert [k["total_ms"] for k in kernels] == sorted((k["total_ms"] for k in kernels), reverse=True)
    assert sum(k["share"] for k in kernels) == pytest.approx(1, abs=0.01)
    assert 0 < gpu["kernel_ms"] <= gpu["wall_ms"]
    weights = sum(a.nbytes for a in open_artifact(tiny_gpu_artifact).weights().values())
    assert gpu["memory"]["weights_bytes"] == weights
    assert gpu["memory"]["peak_bytes"] >= gpu["memory"]["resident_bytes"] >= weights
    assert f"{names[0]} " in text and f"{kernels[0]['share'] * 100:.1f}%" in text  # the text report's top row
    assert "CPU emulation of OpenCL" in report.read_text() and names[0] in report.read_text()
    assert report.with_suffix(".gpu_kernels.png").stat().st_size > 0
    assert f"gpu_kernel,,{names[0]}," in report.with_suffix(".csv").read_text()


def test_kernel_counts_match_the_calls_the_vm_makes(tiny_gpu_artifact: Path, opencl_device: str) -> None:
    """Each kernel the VM calls during decode steps is counted once per call; the paged KV cache's own
    kernels (out of the VM's sight) once per layer and step; device memory holds at least the weights."""
    import edgert
    from edgert.runtime import opencl

    model = edgert.load(tiny_gpu_artifact)
    module = _module_kernels(tiny_gpu_artifact)
    logits = model.prefill(model.tokenizer.encode("Hello there"))
    model.step([int(np.argmax(logits))])  # every kernel built before timing
    calls: dict[str, int] = {}

    def count(func: object, name: str, before: bool, *rest: object) -> int:
        if before and f"{name}_kernel" in module:
            calls[f"{name}_kernel"] = calls.get(f"{name}_kernel", 0) + 1
        return 0

    steps = 3
    model.session.vm.set_instrument(count)
    opencl.start_profiling()
    try:
        for _ in range(steps):
            logits = model.step([int(np.argmax(logits))])
    finally:
        records = opencl.stop_profiling()
        model.session.vm.set_instrument(lambda *a: 0)
    counted: dict[str, int] = {}
    for r in records:
        counted[r["kernel"]] = counted.get(r["kernel"], 0) + r["count"]
        assert r["total_ns"] > 0 and r["min_ns"] <= r["max_ns"] and all(v >= 1 for v in r["local"])
    layers = model.artifact.manifest["model"]["num_layers"]
    assert calls and {k: counted.get(k) for k in calls} == calls
    assert counted["batch_decode_paged_kv_kernel"] == counted["fused_rope_kernel"] == layers * steps
    cache_kernels = {"batch_decode_paged_kv_kernel", "fused_rope_kernel", "tir_kv_cache_transpose_append_kernel"}
    assert set(counted) - set(calls) <= cache_kernels
    memory = opencl.memory()
    weights = sum(int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize for p in model.session.params)
    assert memory["peak_bytes"] >= memory["allocated_bytes"] >= weights


def test_gpu_deploy_builds_the_library_for_the_targets_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `edgert deploy` ships with a GPU artifact: the library built for the target's device (the
    NDK's build for Android, whose absence is named)."""
    import shutil

    from edgert.deploy import gpu_runtime
    from edgert.errors import DeviceError
    from edgert.targets import load_target

    arch = {name: gpu_runtime.library_arch(vars(load_target(name))) for name in ("rk3588-mali", "android-adreno")}
    assert arch == {"rk3588-mali": "aarch64", "android-adreno": "android-arm64"}
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path))
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("aarch64-linux-gnu-g++ is not installed (tools/setup.sh --test installs g++-aarch64-linux-gnu)")
    board = gpu_runtime.host_library("aarch64")  # built into the (empty) cache, then verified
    assert board.parent == tmp_path / "opencl" / "aarch64" and board.read_bytes()[18:20] == b"\xb7\x00"  # EM_AARCH64
    assert json.loads(board.with_suffix(".json").read_text())["arch"] == "aarch64"
    if shutil.which(load_target("android-adreno").cc):
        pytest.skip("the Android NDK is installed here; the missing-NDK error cannot be checked")
    with pytest.raises(DeviceError, match=r"cannot build edgert's OpenCL runtime for android-arm64: .*Android NDK"):
        gpu_runtime.host_library("android-arm64")


def _stream(codec, audio: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    enc, dec = codec.encoder(), codec.decoder()
    codes, out = [], []
    for start in range(0, len(audio), step):
        last = start + step >= len(audio)
        c = enc.push(audio[start : start + step], final=last)
        codes.append(c)
        out.append(dec.push(c, final=last))
    out.append(dec.flush())
    return np.concatenate(codes), np.concatenate(out)


def _speechlike(n: int, rate: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 3 * t)
    voiced = 0.3 * np.sin(2 * np.pi * pitch * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 5 * t))
    return (voiced + 0.03 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.slow
def test_tiny_encodec_on_opencl_matches_the_cpu_build(
    tiny_encodec: Path, tiny_encodec_artifact: Path, tmp_path: Path, opencl_device: str
) -> None:
    """Two LSTM layers (the GPU's one-work-group recurrence), reflect padding, streamed chunks."""
    import edgert

    gpu = edgert.load(_compile(tiny_encodec, "host-opencl", tmp_path / "g.edgert"))
    cpu = edgert.load(tiny_encodec_artifact)  # the same CLI build of the same reference: once per run (conftest)
    assert gpu.session.on_gpu
    audio = _speechlike(320 * 60, 24000, seed=20)
    for step in (1920, 1000):  # whole 80 ms chunks (fixed-shape entries), then odd pushes (symbolic ones)
        (gc, ga), (cc, ca) = _stream(gpu, audio, step), _stream(cpu, audio, step)
        np.testing.assert_array_equal(gc, cc)
        assert np.abs(ga - ca).max() < 1e-4
    codes = cpu.encode(audio)
    assert np.abs(gpu.decode(codes) - cpu.decode(codes)).max() < 1e-4


@pytest.mark.slow
def test_speech_codec_on_opencl_matches_the_cpu_build(
    speech_artifact: Path, tmp_path: Path, opencl_device: str
) -> None:
    import edgert

    gpu = edgert.load(_compile("codec-speech16k", "host-opencl", tmp_path / "speech-gpu.edgert"))
    cpu = edgert.load(speech_artifact)
    audio = _speechlike(16000 * 2, 16000, seed=3)
    (gc, _), (cc, _) = _stream(gpu, audio, 1280), _stream(cpu, audio, 1280)
    assert (gc == cc).mean() > 0.999  # a code equidistant to two within float rounding may go either way
    codes = cpu.encode(audio)
    assert np.abs(gpu.decode(codes) - cpu.decode(codes)).max() < 1e-4


@pytest.mark.slow
def test_whisper_on_opencl_gives_the_host_builds_transcript(
    whisper_artifact: Path, tmp_path: Path, opencl_device: str
) -> None:
    """Encoder convolutions and GEMMs, the decoder with its cross-attention K/V, greedy and beams
    (forked sequences share their prefix's pages: the merged attention of `merge_state_kernel`)."""
    import importlib.util

    import edgert

    spec = importlib.util.find_spec("moonshine_onnx")
    if spec is None or spec.origin is None:
        pytest.fail("useful-moonshine-onnx (beckett.wav) is missing: tools/setup.sh installs it")
    wav = Path(spec.origin).parent / "assets" / "beckett.wav"
    gpu = edgert.load(_compile("whisper-tiny.en", "host-opencl", tmp_path / "whisper-gpu.edgert"))
    cpu = edgert.load(whisper_artifact)
    assert gpu.model.session.on_gpu
    for beam in (1, 5):
        want, got = cpu.transcribe(wav, beam_size=beam), gpu.transcribe(wav, beam_size=beam)
        assert got.text == want.text and "Fail better" in got.text
        assert [s.tokens for s in got.segments] == [s.tokens for s in want.segments]


def test_builds_refuse_what_they_cannot_put_on_the_gpu(tiny_gguf_file: Path, tmp_path: Path) -> None:
    """Never a silent CPU build: a build that does not opt in names its family; options with no GPU
    form are refused, naming the option."""
    from edgert.compiler.compile import Build

    with pytest.raises(TargetError, match="--target host-opencl: the example family has no GPU build yet"):
        Build.start("m", "example", "host-opencl", None, tmp_path / "m.edgert", False)
    with pytest.raises(TargetError, match="--target rk3588-mali: the example family has no GPU build yet"):
        Build.start("m", "example", "rk3588-mali", None, tmp_path / "m.edgert", False)
    proc = run_cli(
        "compile", str(tiny_gguf_file), "--target", "host-opencl", "--activations", "int8", "-o", str(tmp_path / "x")
    )
    assert proc.returncode != 0 and "GPU builds take f32 activations only" in proc.stderr


@pytest.mark.slow
def test_tiny_mimi_on_opencl_matches_the_cpu_build(
    tiny_mimi: Path, mimi_codec, tmp_path: Path, opencl_device: str
) -> None:
    """Mimi through `edgert compile --target host-opencl`: streamed codes (the one-frame chunk entry
    points, frames straddling pushes) and whole-signal ones (the symbolic entry points, whose
    transformer KV copies of window + t frames `GridFallback` schedules) equal the CPU build's;
    decoded audio within 1e-4, all 8 codebooks and the 3 a lower bitrate sends.

    Codes must be identical, not nearly: on this signal (test_codec_mimi's streamed one) the nearest
    code leads the second by over 1e-4 relative in every frame and stage (that test checks it
    against transformers), far above the float32 rounding by which the two builds differ (~1e-7).
    """
    from edgert.families.codec.stream import load_codec

    gpu = load_codec(_compile(tiny_mimi, "host-opencl", tmp_path / "mimi-gpu.edgert"))
    assert gpu.session.on_gpu and not mimi_codec.session.on_gpu
    audio = _speechlike(1920 * 24, 24000, seed=3)
    (gc, ga), (cc, ca) = _stream(gpu, audio, 4100), _stream(mimi_codec, audio, 4100)
    np.testing.assert_array_equal(gc, cc)
    assert np.abs(ga - ca).max() < 1e-4 and np.abs(ca).max() > 0.05
    codes = mimi_codec.encode(audio)
    np.testing.assert_array_equal(gpu.encode(audio), codes)
    for books in (8, 3):
        assert np.abs(gpu.decode(codes[:, :books]) - mimi_codec.decode(codes[:, :books])).max() < 1e-4


@pytest.mark.slow
def test_tiny_marian_on_opencl_matches_the_cpu_build(
    tiny_marian: Path, tiny_marian_artifact: Path, tmp_path: Path, opencl_device: str
) -> None:
    from edgert.families.marian.translator import Translator

    gpu = Translator(_compile(tiny_marian, "host-opencl", tmp_path / "g.edgert"))
    cpu = Translator(tiny_marian_artifact)  # the same CLI build of the same model: once per run (conftest)
    rng = np.random.default_rng(1)
    for beams in (1, 4):
        for _ in range(3):
            src = [int(t) for t in rng.integers(1, 95, size=int(rng.integers(2, 16)))] + [0]
            want = cpu.translate_ids(src, beam_size=beams, max_new_tokens=24)
            assert gpu.translate_ids(src, beam_size=beams, max_new_tokens=24) == want, src


@pytest.mark.slow
def test_smollm2_on_opencl_gives_the_host_builds_tokens(
    smollm_artifact: Path, tmp_path_factory: pytest.TempPathFactory, opencl_device: str
) -> None:
    import edgert

    out = _compile("smollm2-135m", "host-opencl", tmp_path_factory.mktemp("smol-gpu") / "smollm2-gpu.edgert")
    gpu, cpu = edgert.load(out), edgert.load(smollm_artifact)
    prompt = "What is the capital of France?"
    want = [t.id for t in cpu.generate(prompt, max_tokens=16, chat=True)]
    got = [t.id for t in gpu.generate(prompt, max_tokens=16, chat=True)]
    assert got == want
    assert os.environ.get("EDGERT_TEST_UNMARKED") is None
