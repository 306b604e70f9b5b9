"""Runs jax's and Flax's own attention tests with jaxattn swapped in, as a new user would.

    PYTHONPATH=. python tools/upstream_tests.py JAX_OR_FLAX_TEST_FILE [pytest args...]

The test files are not part of this repository (nor fetched by it): pass a checkout's
``tests/nn_test.py`` (jax; run with ``-k DotProductAttention``),
``tests/nnx/nn/attention_test.py`` or ``tests/linen/linen_attention_test.py`` (Flax). The swap:

- ``jax.nn.dot_product_attention`` becomes ``jaxattn.flash_attention`` for the XLA
  implementation (``implementation=None`` or ``"xla"``); ``"cudnn"`` still goes to jax, which
  skips or refuses it on a CPU.
- Flax's ``dot_product_attention`` (nnx and linen) becomes ``jaxattn.flax.attention_fn``,
  both as the module attribute and as the default ``attention_fn`` of the attention layers
  (defaults are bound when a function is defined, so they are replaced where they are stored).

What still fails is listed in README "Differences from jax.nn and Flax" with the reason.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest


def _replace_defaults(function: Any, old: Any, new: Any) -> None:
    """Replaces the default value ``old`` by ``new`` in a function's (keyword) defaults,
    through every ``functools.wraps`` layer (linen wraps the dataclass ``__init__``)."""
    while function is not None:
        function = getattr(function, "__func__", function)
        if function.__defaults__:
            function.__defaults__ = tuple(new if d is old else d for d in function.__defaults__)
        if function.__kwdefaults__:
            function.__kwdefaults__ = {k: new if d is old else d
                                       for k, d in function.__kwdefaults__.items()}
        function = getattr(function, "__wrapped__", None)


def _swap_jax() -> None:
    import jax
    import jax._src.nn.functions as nn_functions

    import jaxattn

    original = nn_functions.dot_product_attention

    def dot_product_attention(query, key, value, bias=None, mask=None, *, implementation=None,
                              **kwargs):
        if implementation == "cudnn":
            return original(query, key, value, bias, mask, implementation=implementation,
                            **kwargs)
        return jaxattn.flash_attention(query, key, value, bias, mask, **kwargs)

    jax.nn.dot_product_attention = dot_product_attention
    nn_functions.dot_product_attention = dot_product_attention


def _swap_flax() -> None:
    import dataclasses

    import flax.linen as linen
    import flax.linen.attention as linen_attention
    import flax.nnx as nnx
    import flax.nnx.nn.attention as nnx_attention

    import jaxattn.flax

    ours = jaxattn.flax.attention_fn
    for module, name in ((nnx_attention, "dot_product_attention"), (nnx, "dot_product_attention"),
                         (linen_attention, "dot_product_attention"),
                         (linen, "dot_product_attention")):
        setattr(module, name, ours)
    _replace_defaults(nnx_attention.MultiHeadAttention.__init__, _original_flax["nnx"], ours)
    for cls in (linen_attention.MultiHeadDotProductAttention, linen_attention.SelfAttention,
                linen_attention.MultiHeadAttention):
        for field in dataclasses.fields(cls):
            if field.default is _original_flax["linen"]:
                field.default = ours
        if getattr(cls, "attention_fn", None) is _original_flax["linen"]:
            cls.attention_fn = ours
        _replace_defaults(cls.__init__, _original_flax["linen"], ours)


_original_flax: dict[str, Any] = {}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    path = argv[0]
    if "flax" in path or "attention_test" in path:
        import flax.linen.attention as linen_attention
        import flax.nnx.nn.attention as nnx_attention

        _original_flax["nnx"] = nnx_attention.dot_product_attention
        _original_flax["linen"] = linen_attention.dot_product_attention
        _swap_flax()
    else:
        _swap_jax()
    return pytest.main([path, "-p", "no:cacheprovider", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
