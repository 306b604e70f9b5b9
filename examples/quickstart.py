"""jaxattn in five minutes: the function, the Flax drop-in, and the self-attention layer.

    python examples/quickstart.py

Run with jaxattn installed: after ``python3 run.py demo`` that means
``source .venv/bin/activate`` first, or ``.venv/bin/python`` instead of ``python``. In a
development tree built with ``tools/build_inplace.sh``, prefix ``PYTHONPATH=.``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

import jaxattn
import jaxattn.flax
from jaxattn.flax.nnx import FlashSelfAttention

key = jax.random.key(0)
kq, kk, kv, kx = jax.random.split(key, 4)

# 1. The function: jax.nn.dot_product_attention's layout [B, T, N, H], fused C++ kernels.
q = jax.random.normal(kq, (2, 1024, 8, 64))
k = jax.random.normal(kk, (2, 1024, 2, 64))  # 2 kv heads: grouped-query attention
v = jax.random.normal(kv, (2, 1024, 2, 64))
out = jaxattn.flash_attention(q, k, v, is_causal=True)
ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
print("flash_attention vs jax.nn:       max |diff| =", float(jnp.abs(out - ref).max()))

# Gradients, jit and vmap work as for any JAX function.
grad_q = jax.jit(jax.grad(lambda q: jaxattn.flash_attention(q, k, v, is_causal=True).sum()))(q)
print("grad shape:", grad_q.shape)

# 2. The drop-in: one argument changes in an existing Flax model.
x = jax.random.normal(kx, (2, 128, 256))
mask = nn.make_causal_mask(jnp.ones((2, 128)))
default = nnx.MultiHeadAttention(8, 256, decode=False, rngs=nnx.Rngs(0))
fast = nnx.MultiHeadAttention(8, 256, decode=False, rngs=nnx.Rngs(0),
                              attention_fn=jaxattn.flax.attention_fn)
print("nnx.MultiHeadAttention drop-in:  max |diff| =",
      float(jnp.abs(default(x, mask=mask) - fast(x, mask=mask)).max()))

layer = nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=jaxattn.flax.attention_fn)
variables = layer.init(jax.random.key(1), x)
baseline = nn.MultiHeadDotProductAttention(num_heads=8).apply(variables, x, mask=mask)
print("linen MultiHeadDotProductAttention drop-in: max |diff| =",
      float(jnp.abs(layer.apply(variables, x, mask=mask) - baseline).max()))

# 3. The layer: causal self-attention with GQA, RoPE and a KV cache for decoding.
attn = FlashSelfAttention(256, 8, num_kv_heads=2, use_rope=True, rngs=nnx.Rngs(0))
full = attn(x)  # [2, 128, 256], causal

attn.init_cache(batch_size=2, max_length=128)
prompt = attn(x[:, :100], decode=True)  # the first 100 tokens in one call
steps = [attn(x[:, t:t + 1], decode=True) for t in range(100, 128)]  # then token by token
decoded = jnp.concatenate([prompt] + steps, axis=1)
print("KV-cache decoding vs full forward: max |diff| =", float(jnp.abs(decoded - full).max()))
np.testing.assert_allclose(decoded, full, rtol=1e-5, atol=1e-5)
