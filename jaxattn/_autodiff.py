"""The one place that decides which kinds of differentiation jaxattn supports.

``flash_attention`` has first derivatives in both modes (a custom JVP whose tangent kernel
is transposed by the backward kernels, flash.py); the other differentiable ops have
reverse-mode gradients (``jax.grad``, ``jax.vjp``, ``jax.jacrev``) through ``jax.custom_vjp``,
and forward mode (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``) is not implemented for them.
Derivatives of a derivative (``jax.hessian``, grad of grad) are implemented for none. Left alone,
JAX reports them with internal messages ("can't apply forward-mode autodiff (jvp) to a
custom_vjp function", "Differentiation rule for 'jaxattn_flash_bwd' not implemented"). Here
they become a ``NotImplementedError`` that names the operation and what to use instead:

* ``check_reverse_mode_only`` runs when a public function is called and sees forward-mode
  tracers among its arguments (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``, and the
  forward-over-reverse of ``jax.hessian``);
* ``forbid_forward_mode`` gives each kernel primitive a differentiation rule that raises, for
  a gradient that is itself differentiated (grad of grad, ``jacrev(grad)``).

* ``forbid_second_derivatives`` does the same for the derivative kernels of an op that has
  first derivatives in both modes (flash_attention).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad

_MESSAGE = (
    "{operation} supports reverse-mode differentiation only (jax.grad, jax.vjp, jax.jacrev): "
    "{what} is not implemented. Use jax.jacrev instead of jax.jacfwd where a Jacobian is "
    "wanted; for forward mode or second derivatives use "
    "jax.nn.dot_product_attention(..., implementation='xla') for this computation.")


def _unsupported(operation: str, what: str) -> NotImplementedError:
    return NotImplementedError(_MESSAGE.format(operation=operation, what=what))


def _in_forward_mode(x: Any) -> bool:
    """Whether ``x`` is traced by forward-mode AD at any level of its tracer nesting."""
    while isinstance(x, jax.core.Tracer):
        if isinstance(x, ad.JVPTracer):
            return True
        # jax.linearize; jax.grad linearizes too, with the trace's is_vjp set. (JAX does not
        # export LinearizeTracer: it is recognised by name, and missing attributes mean "no".)
        trace = getattr(x, "_trace", None)
        if type(x).__name__ == "LinearizeTracer" and not getattr(trace, "is_vjp", True):
            return True
        inner = next((getattr(x, a) for a in ("primal", "val") if hasattr(x, a)), None)
        if inner is None or inner is x:
            return False
        x = inner
    return False


def check_reverse_mode_only(operation: str, *args: Any, message: str | None = None) -> None:
    """Raises NotImplementedError naming ``operation`` (or with ``message``, for an operation
    that has no derivative at all) when an argument is differentiated in forward mode
    (jax.jvp, jax.linearize, jax.jacfwd, jax.hessian)."""
    if any(_in_forward_mode(x) for x in jax.tree.leaves(args)):
        if message is not None:
            raise NotImplementedError(message)
        raise _unsupported(operation, "forward-mode differentiation (jax.jvp, jax.linearize, "
                                      "jax.jacfwd, jax.hessian)")


def forbid_forward_mode(primitive: Primitive, operation: str) -> None:
    """Makes differentiating ``primitive`` itself (what a derivative of a gradient does) raise
    a NotImplementedError naming ``operation``."""

    def rule(primals, tangents, **params):
        del primals, tangents, params
        raise _unsupported(operation, "differentiating its gradient (grad of grad, "
                                      "jax.hessian, jax.jacrev of jax.grad)")

    ad.primitive_jvps[primitive] = rule


def forbid_second_derivatives(primitive: Primitive, operation: str) -> None:
    """Makes differentiating ``primitive`` (a derivative kernel of an op with first
    derivatives in both modes) raise a NotImplementedError naming ``operation``."""

    def rule(primals, tangents, **params):
        del primals, tangents, params
        raise NotImplementedError(
            f"{operation}: second derivatives (jax.hessian, grad of grad, jacfwd of jacrev) "
            "are not implemented; first derivatives work in both modes (jax.grad, jax.vjp, "
            "jax.jacrev, jax.jvp, jax.linearize, jax.jacfwd). For second derivatives use "
            "jax.nn.dot_product_attention(..., implementation='xla').")

    ad.primitive_jvps[primitive] = rule
