// Block-sparse attention for one instruction set (see simd.h for how this file is included).
// The flash tasks of flash_impl.h do the work: given BlockSparseTables they visit only the
// tiles listed there (a TileCursor over one table row), skip every other tile, and apply the
// element mask of partial tiles inside TransformLogits. So the sparse forward and the
// two-pass deterministic backward are the dense ones, tile for tile: on the same tile grid
// (no analytic masks, so flash tiles start at 0 too) the results are bitwise those of flash
// attention with the dense mask.
#pragma once
#include "flash_backward_impl.h"
#include "flash_forward_impl.h"

static BlockSparseTiling SparseTilingImpl(int64_t group) {
  BlockSparseTiling tiling;
  tiling.positions = MaxI(1, kRowsPerTile / MaxI(1, group));  // as MakeContext
  tiling.rows = tiling.positions * MaxI(1, group);
  tiling.keys = kKeysPerTile;
  tiling.rows_padded = RoundUp(tiling.rows, kVL);
  return tiling;
}

template <ProductMode kBF16Mode>
static int64_t SparseForwardImpl(const AttentionProblem& p, const BlockSparseTables& tables,
                                 const FlashForwardResult& res, const Parallel& parallel) {
  return RunForward(p, &tables, kBF16Mode, res, parallel);
}

template <ProductMode kBF16Mode>
static int64_t SparseBackwardImpl(const AttentionProblem& p, const BlockSparseTables& tables,
                                  const FlashBackwardArgs& args, const Parallel& parallel) {
  return RunBackward(p, &tables, kBF16Mode, args, parallel);
}
