"""jaxattn: fast attention for JAX on the CPU."""

from jaxattn import masks
from jaxattn._export import export_disabled_checks
from jaxattn._ffi import kernel_isa
from jaxattn.cache import dequantize_kv, quantize_kv, update_kv_cache, update_paged_kv_cache
from jaxattn.decode import decode_attention, merge_attention_states, paged_decode_attention
from jaxattn.flash import flash_attention
from jaxattn.masks import BlockSparseMask
from jaxattn.sequence_parallel import sequence_parallel_attention
from jaxattn.sparse import block_sparse_attention

__all__ = [
    "BlockSparseMask",
    "block_sparse_attention",
    "decode_attention",
    "dequantize_kv",
    "export_disabled_checks",
    "flash_attention",
    "kernel_isa",
    "masks",
    "merge_attention_states",
    "paged_decode_attention",
    "quantize_kv",
    "sequence_parallel_attention",
    "update_kv_cache",
    "update_paged_kv_cache",
]
