"""Kernels on an OpenCL device through edgert's own OpenCL runtime for TVM.

Here the device is PoCL's CPU emulation (pocl-opencl-icd, installed by tools/setup.sh --test);
the same library runs on Mali and Adreno phones. Modules are compiled for `host-opencl`, exported,
loaded the way the device runtime loads them (tvm_ffi + libtvm_runtime + libedgert_opencl) and
compared with numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgert.errors import EdgertError, NoDeviceError, TargetError
from edgert.runtime import opencl, tvm_runtime
from edgert.targets import load_target

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "tools" / "build_opencl_runtime.sh"
EM_AARCH64 = 183


def build(*args: str, out: Path) -> Path:
    proc = subprocess.run(
        [str(BUILD), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime library built for this machine into a fresh folder, and used by this process."""
    if not Path("/usr/include/CL/cl.h").is_file():
        # tools/setup.sh installs them: their absence is a broken set-up, not a missing device.
        pytest.fail(
            "OpenCL headers are not installed (apt-get install opencl-headers ocl-icd-opencl-dev pocl-opencl-icd)"
        )
    path = build(out=tmp_path_factory.mktemp("opencl"))
    os.environ["EDGERT_OPENCL_RUNTIME"] = str(path)
    return path


@pytest.fixture(scope="module")
def device(library: Path) -> object:
    """opencl:0 (PoCL, which tools/setup.sh installs), or a failure saying why there is none."""
    try:
        opencl.find_device()
    except NoDeviceError as exc:
        pytest.fail(str(exc))
    return tvm_runtime.ffi().device("opencl", 0)


def compile_for(target_name: str, module: object, spec: dict, out: Path) -> Path:
    from tvm import relax

    from edgert.compiler import gpu

    mod, _ = module.export_tvm(spec)
    target, _ = gpu.gpu_target(load_target(target_name))
    executable = relax.build(mod, target=target, relax_pipeline=gpu.gpu_pipeline(target))
    return gpu.export(executable, out, load_target(target_name))


def run(vm: tvm_runtime.VirtualMachine, device: object, name: str, *arrays: np.ndarray) -> list[np.ndarray]:
    result = vm[name](*(tvm_runtime.tensor(a, device) for a in arrays))
    return [tvm_runtime.to_numpy(r) for r in ([result] if hasattr(result, "shape") else result)]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_build_records_the_hash_and_refuses_a_changed_library(library: Path, tmp_path: Path) -> None:
    manifest = opencl.verify(library)
    assert manifest["arch"] == os.uname().machine and manifest["apache-tvm-ffi"]
    copy = tmp_path / library.name
    shutil.copy(library, copy)
    shutil.copy(library.with_suffix(".json"), copy.with_suffix(".json"))
    with copy.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(EdgertError, match="sha256 differs"):
        opencl.verify(copy)
    copy.chmod(0o666)
    with pytest.raises(EdgertError, match="writable by others"):
        opencl.verify(copy)
    with pytest.raises(EdgertError, match="not built"):
        opencl.verify(tmp_path / "missing" / library.name)


def test_device_attributes(device: object) -> None:
    name = opencl.find_device()
    assert "|" in name
    assert opencl.attribute("exist") == 1 and opencl.attribute("exist", 7) == 0
    assert opencl.attribute("max_threads_per_block") >= 1
    assert opencl.attribute("max_shared_memory_per_block") > 0
    assert opencl.attribute("device_name") == name.split(" | ")[0]
    assert opencl.attribute("compute_version").count(".") == 1


def test_matmul_softmax_reduction(device: object, tmp_path: Path) -> None:
    from tvm.relax.frontend import nn

    class Model(nn.Module):
        def forward(self, x: nn.Tensor, w: nn.Tensor):
            y = nn.op.matmul(x, w)
            return nn.op.softmax(y, axis=-1), nn.op.sum(y, axis=-1), nn.op.max(x, axis=0)

    spec = {"forward": {"x": nn.spec.Tensor((24, 64), "float32"), "w": nn.spec.Tensor((64, 48), "float32")}}
    lib = compile_for("host-opencl", Model(), spec, tmp_path / "m.so")
    assert "__kernel" in (tmp_path / "m.cl").read_text()
    vm = opencl.virtual_machine(lib)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 64)) * 0.3).astype("float32")
    w = (rng.standard_normal((64, 48)) * 0.3).astype("float32")
    sm, total, peak = run(vm, device, "forward", x, w)
    y = x.astype("float64") @ w
    np.testing.assert_allclose(sm, softmax(y), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(total, y.sum(-1), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(peak, x.max(0))


def test_mlp_with_symbolic_batch(device: object, tmp_path: Path) -> None:
    from tvm.relax.frontend import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            self.up = nn.Linear(32, 64)
            self.down = nn.Linear(64, 16)

        def forward(self, x: nn.Tensor):
            return self.down(nn.op.silu(self.up(x)))

    model = MLP()
    spec = {"forward": {"x": nn.spec.Tensor(("batch", 32), "float32"), "$": {"param_mode": "plain"}}}
    _, params = model.export_tvm(spec)
    lib = compile_for("host-opencl", model, spec, tmp_path / "mlp.so")
    vm = opencl.virtual_machine(lib)
    rng = np.random.default_rng(1)
    weights = [(rng.standard_normal([int(d) for d in p.shape]) * 0.2).astype("float32") for _, p in params]
    names = [n for n, _ in params]
    assert names == ["up.weight", "up.bias", "down.weight", "down.bias"]
    w_up, b_up, w_down, b_down = weights
    for batch in (1, 5, 33):
        x = rng.standard_normal((batch, 32)).astype("float32")
        (got,) = run(vm, device, "forward", x, *weights)
        h = x.astype("float64") @ w_up.T + b_up
        h = h / (1 + np.exp(-h))
        np.testing.assert_allclose(got, h @ w_down.T + b_down, atol=1e-5, rtol=1e-5)


def test_runtime_path_does_not_import_tvm(device: object, tmp_path: Path) -> None:
    from tvm.relax.frontend import nn

    class Double(nn.Module):
        def forward(self, x: nn.Tensor):
            return nn.op.softmax(x * 2.0, axis=-1)

    lib = compile_for(
        "host-opencl", Double(), {"forward": {"x": nn.spec.Tensor(("n", 16), "float32")}}, tmp_path / "d.so"
    )
    code = (
        "import json, sys, numpy as np\n"
        "from edgert.runtime import tvm_runtime as rt\n"
        f"from edgert.runtime import opencl; vm = opencl.virtual_machine({str(lib)!r})\n"
        "x = np.arange(48, dtype='float32').reshape(3, 16) / 10\n"
        "y = rt.to_numpy(vm['forward'](rt.tensor(x, rt.ffi().device('opencl', 0))))\n"
        "e = np.exp(2 * x - (2 * x).max(-1, keepdims=True)); ref = e / e.sum(-1, keepdims=True)\n"
        "print(json.dumps({'err': float(abs(y - ref).max()), 'tvm': 'tvm' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"err": pytest.approx(0, abs=1e-6), "tvm": False}


def module_bytes(name: str, source: str, arg_types: list[tuple[int, int, int]], tags: list[str]) -> bytes:
    """An OpenCL module as TVM 0.27 serializes it: fmt, {name: FunctionInfo}, source."""

    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    info = (
        s(name.encode())
        + struct.pack("<Q", len(arg_types))
        + b"".join(struct.pack("<BBH", *t) for t in arg_types)
        + struct.pack("<Q", len(tags))
        + b"".join(s(t.encode()) for t in tags)
        + struct.pack("<Q", len(arg_types))
        + b"\0\0\0\0" * len(arg_types)
    )
    return s(b"cl") + struct.pack("<Q", 1) + s(name.encode()) + info + s(f"// Function: {name}\n{source}".encode())


HANDLE = (3, 64, 1)


def load_kernel(name: str, source: str, tags: list[str]) -> object:
    load = tvm_runtime.global_func("ffi.Module.load_from_bytes.opencl")
    return load(module_bytes(name, source, [HANDLE], tags))[name]


def test_bad_kernel_names_itself_and_shows_the_compiler_log(device: object) -> None:
    kernel = load_kernel(
        "broken_kernel", "__kernel void broken_kernel(__global float* a) { a[0] = undefined_name; }", ["threadIdx.x"]
    )
    out = tvm_runtime.tensor(np.zeros(4, "float32"), device)
    with pytest.raises(Exception, match="broken_kernel") as info:
        kernel(out, 4)
    assert "failed to build" in str(info.value) and "undefined_name" in str(info.value)


def test_oversized_work_group_is_refused_with_the_numbers(device: object) -> None:
    source = "__kernel void fill(__global float* a) { a[get_global_id(0)] = 1.0f; }"
    kernel = load_kernel("fill", source, ["blockIdx.x", "threadIdx.x"])
    out = tvm_runtime.tensor(np.zeros(64, "float32"), device)
    kernel(out, 2, 32)  # a group size the device takes runs
    assert (tvm_runtime.to_numpy(out) == 1).all()
    too_big = int(opencl.attribute("max_threads_per_block")) * 2
    with pytest.raises(Exception, match=rf"'fill': work-group size {too_big}x1x1 = {too_big} exceeds"):
        kernel(out, 1, too_big)


def test_out_of_memory_is_an_error(device: object) -> None:
    alloc = tvm_runtime.global_func("runtime.TVMTensorAllocWithScope")
    with pytest.raises(Exception, match="OpenCL out of memory"):
        alloc(tvm_runtime.shape([1 << 50]), "float32", device, None)


def test_cross_build_for_aarch64_is_an_aarch64_elf(tmp_path: Path) -> None:
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("aarch64-linux-gnu-g++ is not installed (tools/setup.sh --test installs g++-aarch64-linux-gnu)")
    path = build("--arch", "aarch64", out=tmp_path)
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and struct.unpack("<H", header[18:20])[0] == EM_AARCH64
    assert json.loads(path.with_suffix(".json").read_text())["arch"] == "aarch64"


def test_mali_board_build_is_cross_compiled(tmp_path: Path) -> None:
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("aarch64-linux-gnu-g++ is not installed (tools/setup.sh --test installs g++-aarch64-linux-gnu)")
    from tvm.relax.frontend import nn

    class Model(nn.Module):
        def forward(self, x: nn.Tensor, w: nn.Tensor):
            return nn.op.softmax(nn.op.matmul(x, w), axis=-1)

    spec = {"forward": {"x": nn.spec.Tensor(("n", 64), "float32"), "w": nn.spec.Tensor((64, 64), "float32")}}
    lib = compile_for("rk3588-mali", Model(), spec, tmp_path / "mali.so")
    assert struct.unpack("<H", lib.read_bytes()[18:20])[0] == EM_AARCH64
    assert "__kernel void" in (tmp_path / "mali.cl").read_text()


def test_android_adreno_needs_the_ndk_but_writes_the_kernels(tmp_path: Path) -> None:
    spec = load_target("android-adreno")
    if shutil.which(spec.cc):
        pytest.skip("the Android NDK is installed here; the missing-NDK error cannot be checked")
    from tvm.relax.frontend import nn

    class Model(nn.Module):
        def forward(self, x: nn.Tensor):
            return nn.op.softmax(x, axis=-1)

    with pytest.raises(TargetError, match="Android NDK"):
        compile_for(
            "android-adreno", Model(), {"forward": {"x": nn.spec.Tensor((4, 32), "float32")}}, tmp_path / "a.so"
        )
    assert "__kernel void" in (tmp_path / "a.cl").read_text()


@pytest.mark.slow
def test_tiny_llama_with_paged_kv_cache_matches_the_cpu(device: object, tmp_path: Path) -> None:
    """TVM's paged KV cache picks its GPU kernels for an OpenCL target; prefill and decode on the
    OpenCL device give the CPU build's logits (random weights, 2 layers, grouped-query heads)."""
    import tvm

    from edgert.compiler import gpu
    from edgert.compiler.passes.pipeline import relax_pipeline
    from edgert.compiler.target import resolve
    from edgert.families.llama import model as llama

    cfg = llama.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, context_length=128, tie_word_embeddings=False,
    )  # fmt: skip

    def build(target: object, pipeline: object, path: Path) -> list:
        net = llama.LlamaForCausalLM(cfg)
        with target:
            mod, params = net.export_tvm(spec=net.get_default_spec())
        tvm.compile(mod, target=target, relax_pipeline=pipeline).export_library(str(path))
        return params

    cpu_target, _ = resolve(load_target("host"))
    params = build(cpu_target, relax_pipeline(cpu_target), tmp_path / "cpu.so")
    gpu_target, _ = gpu.gpu_target(load_target("host-opencl"))
    build(gpu_target, gpu.gpu_pipeline(gpu_target), tmp_path / "gpu.so")
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal([int(d) for d in p.shape]) * 0.1).astype("float32") for _, p in params]

    def generate(path: Path, dev_type: int) -> list[np.ndarray]:
        vm = opencl.virtual_machine(path) if dev_type == tvm_runtime.OPENCL else tvm_runtime.VirtualMachine(path)
        dev = tvm_runtime.ffi().device("opencl" if dev_type == tvm_runtime.OPENCL else "cpu", 0)
        on_device = [tvm_runtime.tensor(w, dev) for w in weights]
        get, shape = tvm_runtime.global_func, tvm_runtime.shape
        cache = vm["create_kv_cache"](shape([1]), shape([64]), shape([16]), shape([16]), shape([0]))
        get("vm.builtin.kv_state_add_sequence")(cache, 0)
        tokens, logits = np.array([[5, 17, 3, 99, 42, 7]], "int32"), []
        for entry in ("prefill", "decode", "decode", "decode"):
            get("vm.builtin.kv_state_begin_forward")(cache, shape([0]), shape([tokens.shape[1]]))
            out, _ = vm[entry](tvm_runtime.tensor(tokens, dev), cache, on_device)
            get("vm.builtin.kv_state_end_forward")(cache)
            logits.append(tvm_runtime.to_numpy(out))
            tokens = np.array([[int(logits[-1].argmax())]], "int32")
        return logits

    want = generate(tmp_path / "cpu.so", tvm_runtime.CPU)
    got = generate(tmp_path / "gpu.so", tvm_runtime.OPENCL)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
