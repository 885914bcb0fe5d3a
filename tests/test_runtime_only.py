"""The device runtime runs with TVM's runtime library alone and never imports the compiler side.

A device needs only `tvm_ffi` and `libtvm_runtime.so`: loading and running an artifact must not
import the `tvm` Python package (its import alone costs 0.45 s and 80 MiB), the compiler library,
edgert's compiler, frontend or model families.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DIR = ROOT / "edgert" / "runtime"

# The compile side: the compiler, model readers, the CLI, the host end of the links, and each
# family's build, nn.Module and loaders (a family's runtime task and device ops are allowed).
FORBIDDEN_EDGERT = (
    "edgert.compiler",
    "edgert.frontend",
    "edgert.cli",
    "edgert.families.shared",
    "edgert.deploy.links",
    "edgert.deploy.board",
    "edgert.deploy.profiling",
    *(
        f"edgert.families.{family}.{part}"
        for family in ("llama", "whisper", "marian", "codec", "graph")
        for part in (
            *("build", "model", "loader", "mimi", "ct2", "assets"),
            *("kernels", "transformer", "lower", "npu", "calibrate"),
        )
    ),
)
FORBIDDEN_TVM = ("tvm.relax", "tvm.s_tir", "tvm.te", "tvm.topi")


def _forbidden(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def device_side_files() -> list[Path]:
    """The runtime, the artifact reader, the registry, and every runtime task and device op it names."""
    from edgert.families.registry import FAMILIES

    refs = [f.task for f in FAMILIES] + [ref for f in FAMILIES for ref in f.device_ops.values()]
    named = {_module_file(ref.partition(":")[0]) for ref in refs}
    assert None not in named, refs
    return sorted({*RUNTIME_DIR.glob("*.py"), ROOT / "edgert" / "families" / "registry.py", *named})


def _run_python(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


REPORT = """
import json, sys
libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps") if "libtvm" in line})
print(json.dumps({"modules": sorted(sys.modules), "libs": libs, **RESULT}))
"""


@pytest.mark.slow
def test_generate_with_the_runtime_library_only(smollm_artifact: Path) -> None:
    run = _run_python(
        "import edgert\n"
        f"m = edgert.load({str(smollm_artifact)!r})\n"
        "toks = list(m.generate('What is the capital of France?', max_tokens=16, chat=True))\n"
        "RESULT = {'text': ''.join(t.text for t in toks), 'ids': [t.id for t in toks]}\n" + REPORT
    )
    assert len(run["ids"]) > 0
    assert "Paris" in run["text"], run["text"]

    assert "libtvm_runtime.so" in run["libs"]
    assert not any("compiler" in lib for lib in run["libs"]), run["libs"]
    assert "tvm_ffi" in run["modules"]
    assert [m for m in run["modules"] if _forbidden(m, ("tvm", "torch", "ml_dtypes"))] == []
    assert [m for m in run["modules"] if _forbidden(m, FORBIDDEN_EDGERT)] == []
    assert "edgert.runtime.generator" in run["modules"]  # the check looked at the right process


def _imports(path: Path) -> list[str]:
    """Every module a file imports, anywhere in it (also inside functions), with relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_runtime_sources_import_nothing_from_the_compiler_side() -> None:
    """Walk the device side (runtime, registry, the families' tasks) and what it imports, transitively."""
    todo = device_side_files()
    assert RUNTIME_DIR / "generator.py" in todo
    assert ROOT / "edgert" / "families" / "whisper" / "transcriber.py" in todo
    # The walker sees imports inside functions too.
    seen: set[Path] = set()
    bad: list[str] = []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            if _forbidden(name, FORBIDDEN_EDGERT + FORBIDDEN_TVM):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif name.startswith("edgert.") and (dep := _module_file(name)) is not None:
                todo.append(dep)
    assert bad == []
    # The walk reached the shared modules the runtime relies on.
    assert {ROOT / "edgert" / "targets.py", ROOT / "edgert" / "errors.py"} <= seen


def test_tensors_round_trip_through_the_runtime_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tvm_runtime` copies numpy in and out, also where numpy's DLPack import refuses a tensor."""
    import numpy as np

    from edgert.runtime import tvm_runtime

    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    t = tvm_runtime.tensor(a)
    np.testing.assert_array_equal(tvm_runtime.to_numpy(t), a)
    tvm_runtime.copy_into(t, a * 2)

    def refuse(_value: object) -> None:
        raise BufferError("no DLPack")

    monkeypatch.setattr(np, "from_dlpack", refuse)
    out = tvm_runtime.to_numpy(t)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a * 2)
