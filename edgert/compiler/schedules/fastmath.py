"""Graph rewrite: the logistic sigmoid through tanh, so that it takes TOPI's polynomial tanh.

Relax's ``FastMathTransform`` gives exp, erf, tanh and softmax vectorizable polynomial forms;
``sigmoid`` it leaves to LLVM's ``exp`` intrinsic, which the CPU backend calls once per element
(57,600 sigmoids of a conformer's Swish took 0.087 ms, a multiply over them 0.004 ms). The
identity ``sigmoid(x) = 0.5 + 0.5 * tanh(x / 2)`` is exact; the polynomial tanh is within about
1e-7 of it (absolute), which is what the sigmoid then carries.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax


@relax.expr_functor.mutator
class _SigmoidAsTanh(relax.PyExprMutator):
    def __init__(self, mod: Any):
        super().__init__(mod)
        self.mod_ = mod
        self.sigmoid = tvm.ir.Op.get("relax.sigmoid")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != self.sigmoid:
            return call
        ty = call.args[0].ty
        if not isinstance(ty, relax.TensorType) or ty.dtype != "float32":
            return call
        half = relax.const(0.5, "float32")
        t = self.builder_.emit(relax.op.tanh(relax.op.multiply(call.args[0], half)))
        return relax.op.add(relax.op.multiply(t, half), half)

    def transform(self) -> Any:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


def sigmoid_as_tanh(mod: Any) -> Any:
    """``mod`` with every f32 ``R.sigmoid(x)`` written as ``0.5 + 0.5 * tanh(0.5 * x)``."""
    return _SigmoidAsTanh(mod).transform()


def vectorizable_nearbyint() -> None:
    """Mark TIR's ``nearbyint`` vectorizable (``TVectorizable``), as TVM marks ``round``, ``floor``, ``exp``.

    Why: TVM 0.27 leaves the attribute off ``tirx.nearbyint`` (the rounding of every quantize), so its
    vectorizer gave up on any loop holding one and left it scalar; LLVM then vectorized that loop
    across the wrong axis, with a gather and a scatter per 8 values (MobileNet's first int8 conv: its
    requantization epilogue took twice the conv, 0.028 against 0.011 ms for the float model's).
    LLVM has ``llvm.nearbyint`` on vectors (``vrndscaleps``, ``frintx``): the values are the same.
    """
    op = tvm.ir.Op.get("tirx.nearbyint")
    if op.get_attr("TVectorizable") is None:
        op.set_attr("TVectorizable", True)
