"""examples/gemma_swap.py: jaxattn inside gemma's Transformer and Sampler (skipped without gemma).

gemma needs Python >= 3.12 and is heavy, so this runs only where it is installed, e.g.
    cd /tmp && /work/venv312/bin/python -m pytest /path/to/jaxattn/tests/test_gemma_swap.py
(run from outside the repository so that the installed jaxattn, built for that Python, is used).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("gemma", reason="gemma (Python >= 3.12) is not installed")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


@pytest.fixture(scope="module")
def swap():
    path = Path(__file__).resolve().parents[1] / "examples" / "gemma_swap.py"
    spec = importlib.util.spec_from_file_location("gemma_swap", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gemma_swap"] = module
    spec.loader.exec_module(module)
    yield module
    module._MODE = "auto"


@pytest.fixture(scope="module")
def models(swap):
    from gemma import gm

    # Small but with every feature: GQA 8/4 heads of 256, window 16 on alternating layers, cap.
    config = swap.make_config("gemma2", embed_dim=128, hidden_dim=256, vocab=1024, window=16)
    ref = gm.nn.Transformer(config=config, dtype=jnp.float32)
    new = swap.with_jaxattn(gm.nn.Transformer)(config=config, dtype=jnp.float32)
    params = ref.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    return ref, new, params


@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
def test_logits_match_gemma(swap, models, left):
    ref, new, params = models
    tokens = swap._random_tokens(np.random.default_rng(0), [48, 30, 7], 48, left)
    ok, msg = swap.check_logits(ref, new, params, tokens, tol=1e-4)
    assert ok, msg


def test_logits_match_gemma_without_padding(swap, models):
    """One unpadded prompt per row: the index route (positions are indices)."""
    ref, new, params = models
    tokens = swap._random_tokens(np.random.default_rng(1), [48, 48], 48, False)
    ok, msg = swap.check_logits(ref, new, params, tokens, tol=1e-4)
    assert ok, msg


def test_positions_are_indices(swap):
    q_pos = jnp.array([[0, 1, 2], [5, 6, 7]])
    assert bool(swap._positions_are_indices(q_pos, jnp.array([[0, 1, 2, 3], [5, 6, 7, 8]])))
    # a key moved past every query (padding), or a gap in the query positions: not indices
    assert not bool(swap._positions_are_indices(q_pos, jnp.array([[0, 1, 2, 2**30],
                                                                  [5, 6, 7, 8]])))
    assert not bool(swap._positions_are_indices(jnp.array([[0, 2, 3]]), jnp.array([[0, 2, 3]])))


def test_check_detects_a_wrong_mask(swap, models):
    """The index path ignores left padding: the logit check must see it (it can fail)."""
    from gemma import gm

    ref, _, params = models
    # A new class: gemma's Transformer.__call__ is jitted with the module static, so the model
    # of the other tests would reuse its trace (the mode is read while tracing).
    forced = swap.with_jaxattn(gm.nn.Transformer)(config=ref.config, dtype=jnp.float32)
    tokens = swap._random_tokens(np.random.default_rng(0), [48, 30, 7], 48, left=True)
    swap._MODE = "index"
    try:
        ok, _ = swap.check_logits(ref, forced, params, tokens, tol=1e-4)
    finally:
        swap._MODE = "auto"
    assert not ok


def test_greedy_tokens_match_gemma_sampler(swap, models):
    ref, new, params = models
    same, msg = swap.check_greedy(ref, new, params, ["A longer prompt, past the window.", "Hi"],
                                  max_new_tokens=6, cache_length=64)
    assert same, msg
