"""Turn the large constants of a Relax function into parameters, so weights live in the artifact's
safetensors file and not inside the compiled library.

TVM's ONNX importer can keep initializers as inputs (``keep_params_in_input``), but then shape
tensors and weights that later passes would fold (transposes, packing) stay opaque. So the graph is
imported with constants, optimized, and only then are the remaining large constants lifted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

# Constants with fewer elements stay in the library: scalars, shapes, small tables.
MIN_ELEMENTS = 256


@relax.expr_functor.mutator
class _Lifter(relax.PyExprMutator):
    def __init__(self, mod: Any, min_elements: int):
        super().__init__(mod)
        self.min_elements = min_elements
        self.vars: list[relax.Var] = []
        self.arrays: list[np.ndarray] = []
        self._seen: dict[Any, relax.Var] = {}

    def visit_generic_const_(self, const: Any) -> relax.Expr:
        if len(const.value.shape) == 0 or int(np.prod(const.value.shape)) < self.min_elements:
            return const
        if const in self._seen:
            return self._seen[const]
        var = relax.Var(f"w{len(self.vars)}", relax.TensorType(list(const.value.shape), const.value.dtype))
        self._seen[const] = var
        self.vars.append(var)
        self.arrays.append(const.value.numpy())
        return var


def lift_constants(mod: Any, func_name: str = "main", min_elements: int = MIN_ELEMENTS) -> tuple[Any, list[np.ndarray]]:
    """Return (module whose ``func_name`` takes the large constants as trailing parameters, their values)."""
    func = mod[func_name]
    lifter = _Lifter(mod, min_elements)
    body = lifter.visit_expr(func.body)
    new_func = relax.Function(list(func.params) + lifter.vars, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    mod = mod.clone() if hasattr(mod, "clone") else mod
    mod[func_name] = new_func
    return mod, lifter.arrays
