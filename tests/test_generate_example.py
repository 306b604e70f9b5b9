"""examples/generate.py at a tiny size: chunked prefill of ragged prompts, greedy decoding and
beam search over a paged cache agree with a reference without any cache (dense causal
attention over the whole sequence, recomputed every step)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

TINY = ["--d-model", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "8", "--new-tokens", "6", "--page-size", "4", "--chunk", "20",
        "--beams", "3"]


@pytest.fixture(scope="module")
def generate():
    path = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_runs_and_matches_the_reference_without_a_cache(generate, capsys):
    # --check asserts greedy (every prompt) and beam outputs equal the reference.
    results = generate.main(TINY + ["--cache-dtypes", "float32", "int8", "--check"])
    table = capsys.readouterr().out
    assert "| float32 |" in table and "| int8 |" in table
    assert results["float32"]["greedy"].shape == (len(generate.PROMPTS), 6)


def test_chunk_size_does_not_change_the_result(generate):
    """Prefill in chunks of 3 (the decode kernel, many ragged steps) or 20 (the flash tiles):
    the same tokens."""
    config = generate.Config(d_model=32, layers=2, heads=4, kv_heads=2, head_dim=8)
    params = generate.init_params(config)
    prompts = [list(p.encode()) for p in generate.PROMPTS]
    small, _, _ = generate.greedy(config, params, prompts, 5, jnp.float32, 4, 3)
    large, _, _ = generate.greedy(config, params, prompts, 5, jnp.float32, 4, 20)
    np.testing.assert_array_equal(small, large)


def test_beams_share_prompt_pages_without_copies(generate):
    """Beam search whose beams share the prompt's pages and reorder through block-table rows
    equals the reference beam search (same beam, same log-probability)."""
    config = generate.Config(d_model=32, layers=1, heads=2, kv_heads=1, head_dim=8)
    params = generate.init_params(config)
    prompt = list(b"shared prefix")
    best, score = generate.beam_search(config, params, prompt, 4, 5, jnp.float32, 4, 8)
    ref_best, ref_score = generate.reference_beam(config, params, prompt, 4, 5)
    np.testing.assert_array_equal(best, ref_best)
    assert abs(score - ref_score) < 1e-3
