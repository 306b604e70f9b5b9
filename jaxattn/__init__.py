"""jaxattn: fast attention for JAX on the CPU."""

from pathlib import Path as _Path

from jaxattn._version import __version__

try:
    from jaxattn import _jaxattn  # noqa: F401  (the compiled kernels, first: a clear error if absent)
except ImportError as _error:
    from jaxattn._extension_check import missing_extension_message as _message

    raise ImportError(_message(_Path(__file__).parent, _error)) from None

from jaxattn import masks
from jaxattn._export import export_disabled_checks
from jaxattn._ffi import available_kernel_isas, kernel_isa, kernel_isas
from jaxattn.cache import dequantize_kv, quantize_kv, update_kv_cache, update_paged_kv_cache
from jaxattn.decode import decode_attention, paged_decode_attention
from jaxattn.dropout import dropout_mask
from jaxattn.merge import merge_attention_states
from jaxattn.flash import flash_attention
from jaxattn.linear import gated_linear_attention
from jaxattn.masks import BlockSparseMask
from jaxattn.sequence_parallel import sequence_parallel_attention
from jaxattn.sparse import block_sparse_attention

__all__ = [
    "BlockSparseMask",
    "__version__",
    "available_kernel_isas",
    "block_sparse_attention",
    "decode_attention",
    "dequantize_kv",
    "dropout_mask",
    "export_disabled_checks",
    "flash_attention",
    "gated_linear_attention",
    "kernel_isa",
    "kernel_isas",
    "masks",
    "merge_attention_states",
    "paged_decode_attention",
    "quantize_kv",
    "sequence_parallel_attention",
    "update_kv_cache",
    "update_paged_kv_cache",
]
