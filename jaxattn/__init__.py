"""jaxattn: fast attention for JAX on the CPU."""

from jaxattn import masks
from jaxattn._export import export_disabled_checks
from jaxattn._ffi import kernel_isa
from jaxattn.decode import decode_attention, merge_attention_states, paged_decode_attention
from jaxattn.flash import flash_attention
from jaxattn.linear import gated_linear_attention
from jaxattn.masks import BlockSparseMask
from jaxattn.sequence_parallel import sequence_parallel_attention
from jaxattn.sparse import block_sparse_attention

__all__ = [
    "BlockSparseMask",
    "block_sparse_attention",
    "decode_attention",
    "export_disabled_checks",
    "flash_attention",
    "gated_linear_attention",
    "kernel_isa",
    "masks",
    "merge_attention_states",
    "paged_decode_attention",
    "sequence_parallel_attention",
]
