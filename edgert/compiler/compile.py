"""What every family's build shares: the request it gets, the result it returns, and how the
compiled library and the weights are written into an artifact's staging folder.

`edgert.families.registry.compile_model` chooses the family and calls its build with a
`BuildRequest`; nothing here knows a family by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.errors import ModelFileError
from edgert.recipes import Recipe
from edgert.version import __version__

Progress = Callable[[str, float | None], None]


def quiet(_stage: str, _fraction: float | None) -> None:
    """A progress callback that reports nothing."""
    return None


@dataclass
class CompileResult:
    """What a build wrote and how long each stage took."""

    path: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


@dataclass
class BuildRequest:
    """One compile: the model source, its recipe (if named by one), the target and the options.

    ``options`` holds only the options the user set (``quant``, ``threads``, ``context_length``,
    ...); the registry has already refused any the family does not take.
    """

    model: str
    source: Path
    recipe: Recipe | None
    target: str
    output: Path | None
    as_dir: bool = False
    progress: Progress = quiet
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The artifact's name: the recipe's, else the source file's stem."""
        return self.recipe.name if self.recipe else self.source.stem

    def option(self, key: str, default: Any = None) -> Any:
        """An option as the user set it, else the recipe's ``[compile]`` value, else ``default``."""
        value = self.options.get(key)
        if value is not None:
            return value
        if self.recipe is not None and key in self.recipe.compile:
            return self.recipe.compile[key]
        return default

    def default_output(self) -> Path:
        """``output`` if given, else ``NAME.edgert`` in the working folder."""
        return Path(self.output) if self.output else Path(f"{self.name}.edgert")


def base_manifest(name: str, family: str, target_record: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """The fields every family's manifest starts with; ``sections`` follow in the given order."""
    import tvm

    return {
        "name": name,
        "family": family,
        "created_by": f"edgert {__version__}",
        "tvm_version": tvm.__version__,
        "target": target_record,
        **sections,
    }


def cached_library(folder: str | Path, mod: Any, target: Any, cc: str | None) -> Path:
    """Where ``folder`` keeps the library of ``mod`` built for ``target`` (it may not exist yet).

    The key is TVM's structural hash of the whole module (every Relax function and TIR kernel)
    with the target, the cross compiler and the TVM version, so only an identical build is reused.
    """
    import hashlib

    import tvm
    from tvm_ffi import structural_hash

    key = f"{structural_hash(mod)}|{target}|{cc}|{tvm.__version__}|{__version__}"
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.so"


def main_dtype(arrays: dict[str, Any]) -> str:
    """The dtype that holds most of the weight bytes."""
    totals: dict[str, int] = {}
    for a in arrays.values():
        totals[str(a.dtype)] = totals.get(str(a.dtype), 0) + a.nbytes
    return max(totals, key=totals.__getitem__)


def stage_library_and_weights(
    executable: Any,
    named_params: list[tuple[str, Any]],
    weights: Any,
    repack: dict[str, Callable[[Any], dict[str, Any]]],
    stage: Path,
    fcompile: Any,
    source: Path,
    extra_tensors: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, float]]:
    """Write ``model.so`` and ``weights.safetensors`` into ``stage``; return the weights' order and timings.

    ``weights`` yields (parameter name, source array); a name the layout packed goes through its
    ``repack`` function (which may turn one source tensor into several parameters), any other is
    cast to the parameter's dtype. Every parameter of the exported module must get an array of
    its exact shape and dtype. ``extra_tensors`` (e.g. Whisper's mel filters) follow the
    parameters, outside the order the entry points take them in.
    """

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    executable.export_library(str(stage / "model.so"), fcompile=fcompile)
    seconds["link"] = time.perf_counter() - t

    t = time.perf_counter()
    order, _ = write_weights(named_params, weights, repack, stage, source, extra_tensors)
    seconds["weights"] = time.perf_counter() - t
    return order, seconds


def write_weights(
    named_params: list[tuple[str, Any]],
    weights: Any,
    repack: dict[str, Callable[[Any], dict[str, Any]]],
    stage: Path,
    source: Path,
    extra_tensors: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Write ``stage/weights.safetensors`` in the parameters' order; return that order and the arrays by name.

    ``weights`` yields (parameter name, source array); a packed name goes through ``repack``, any
    other is cast to the parameter's dtype; each array must have its parameter's exact shape and dtype.
    """
    import numpy as np

    from edgert.artifact.tensorfile import write_tensors

    shapes = {n: tuple(int(d) for d in p.shape) for n, p in named_params}
    dtypes = {n: p.dtype for n, p in named_params}
    arrays: dict[str, Any] = {}
    for pname, w in weights:
        packed = repack[pname](w) if pname in repack else {pname: np.asarray(w, dtype=dtypes.get(pname))}
        for n, a in packed.items():
            if n not in shapes or a.shape != shapes[n] or str(a.dtype) != dtypes[n]:
                raise ModelFileError(
                    f"{source}: weight '{n}' is {a.dtype}{list(a.shape)}, expected "
                    f"{dtypes.get(n)}{list(shapes.get(n, ()))}"
                )
            arrays[n] = a
    missing = [n for n in shapes if n not in arrays]
    if missing:
        raise ModelFileError(f"{source}: weights missing for {', '.join(missing[:5])}")
    order = [n for n, _ in named_params]
    with (stage / "weights.safetensors").open("wb") as fh:
        write_tensors(fh, {**{n: arrays[n] for n in order}, **(extra_tensors or {})}, {"format": "edgert"})
    return order, arrays
