// Flash attention forward and backward for one instruction set (see simd.h for how this file
// is included). Tiles: a block of query rows (the T positions of a block times the G query
// heads of one GQA group, so each K/V tile is loaded once per group) against blocks of keys.
//
// Forward: S = (scale Q) K^T, bias, soft cap, masks, online softmax, O += P V; LSE saved.
// Backward, two passes so that no two threads ever write the same output row (deterministic
// for any thread count, no atomics):
//   pass 1, per query block:  D = rowsum(dO * O) - dlse;  dQ = scale * sum_j dS K
//   pass 2, per key block:    dV = sum_i P^T dO;  dK = scale * sum_i dS^T Q
// with P = exp(S - lse) recomputed and dS = P * (dP - D), dP = dO V^T.
//
// Every task visits its tiles through a TileCursor: a dense range (flash attention, tiles cut
// by the analytic masks) or one row of a block-sparse table (sparse_impl.h), so that one
// routine does the work of both.
//
// The pieces, each included where it is used:
//   flash_context.h   per-call constants (tile sizes, product mode), task scratch
//   flash_tiles.h     task order, a tile's query rows, the tiles a task visits (TileCursor)
//   visibility.h      lengths, masks, positions, segment ids; tile classification (scalar)
//   flash_logits.h    bias, ALiBi, soft cap and masks applied to a tile of logits
//   flash_products.h  operand packing and the products (float32, bf16 pairs, AMX)
//   online_softmax.h  the online softmax step (shared with decode)
//   dropout.h         dropout on the attention weights (the hash: dropout_hash.h)
//   flash_forward_impl.h, flash_backward_impl.h   the tasks and their entry points
//   flash_jvp_impl.h  forward-mode derivative; sparse_impl.h block-sparse entry points
#pragma once
#include "flash_backward_impl.h"
#include "flash_forward_impl.h"
