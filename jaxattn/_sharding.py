"""Partitioning of the jaxattn custom calls along batch and heads (see docs/sharding.md).

Every primitive describes, once, which axis of each operand and result is the batch axis and
which is a head axis (``_define(..., axes="btnh,bskh,...->btnd,btn")``). From that one line:

* the lowering, in a multi-device computation, hands XLA's batch partitioner
  (``jax.ffi.register_ffi_target_as_batch_partitionable``) a *view* of every buffer whose
  leading dims are [batch, heads], with the ``num_batch_dims`` frontend attribute and a Shardy
  ``sdy.sharding_rule``; XLA then runs the call on each device's shard with no collectives;
* the abstract evaluation gives results the sharding of the inputs' batch and head axes (for
  meshes with explicit axes) and the union of the inputs' varying manual axes (``shard_map``).

How a buffer becomes a view: a transpose that puts batch and heads first, with a custom-call
layout equal to the original row-major order (XLA makes it a bitcast: no bytes move); for a
buffer that lacks a partitioned axis or has it broadcast (size 1, e.g. a [B, 1, T, S] mask or
the [B] lengths), a broadcast along that axis laid out outermost, so that its first slice is the
original (materialised per shard: the only copy an operand ever gets); a buffer with no
partitioned axis at all (a [1, 1, T, S] bias, an absent operand) is flattened to rank 1, which
the partitioner replicates. The int64 attribute ``jaxattn_views`` tells the C++ side
(cc/ffi/shard_views.cc, ``CallWithViews``) how to recover the dims each handler expects:
handlers and kernels never see views. Results come back through the inverse transpose, which XLA's CPU
layout assignment does not turn into a bitcast: one copy of each result (XLA emits it as two
fused loops), the price of partitioning heads; when the types say the heads are whole (every
mesh axis explicit, no head axis sharded), the call partitions the batch only and its results
come back as bitcasts. Single-device programs, fully manual
``shard_map`` bodies and ``pmap`` lower to the plain custom call and pay nothing.

The sharding-rule helpers come from ``jax._src`` (jax's own linalg lowerings use them; there is
no public API for a custom call's Shardy rule): pin jax when upgrading.

Axis letters: ``b`` batch, ``n`` query heads, ``k`` kv heads (``n = k * g`` with g the GQA
group); any other letter is an axis that is not partitioned. Query heads and kv heads are one
partition factor: heads are split in whole GQA groups, and the C++ side refuses (an error,
never wrong numbers) a split where query and kv heads were cut in different ratios.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from jax._src import config as jax_config
from jax._src import core
from jax._src.custom_partitioning_sharding_rule import (
    ArrayMapping,
    CompoundFactor,
    SdyShardingRule,
    sdy_sharding_rule_to_mlir,
)
from jax._src.lib.mlir.dialects import hlo
from jax.interpreters import mlir
from jax.sharding import AxisType, PartitionSpec

VIEWS_ATTR = "jaxattn_views"
_FACTOR_OF = {"b": "b", "n": "h", "k": "h"}  # axis letter -> partition factor


@dataclasses.dataclass(frozen=True)
class Axes:
    """Which axis of each operand and result is batch (``b``) or heads (``n``, ``k``).

    Attributes:
      operands: one string per operand, one letter per axis (e.g. ``"btnh"``).
      results: the same for the results.
      factors: the partition factors, in view order: ``"b"`` batch, ``"h"`` heads.
    """

    operands: tuple[str, ...]
    results: tuple[str, ...]
    factors: str = "bh"

    @classmethod
    def parse(cls, spec: str, factors: str = "bh") -> Axes:
        """Parses ``"btnh,bskh->btnd,btn"``."""
        lhs, rhs = spec.replace(" ", "").split("->")
        axes = cls(tuple(lhs.split(",")), tuple(rhs.split(",")), factors)
        for letters in axes.results:
            missing = [f for f in factors
                       if not any(_FACTOR_OF.get(c) == f for c in letters)]
            if missing:
                raise ValueError(f"result axes {letters!r} lack partition factors {missing}")
        return axes


# ------------------------------------------------------------------------------------------
# Abstract evaluation: result shardings and varying manual axes


def _spec_entry(aval, axis: int):
    spec = getattr(getattr(aval, "sharding", None), "spec", None)
    if spec is None or axis >= len(spec):
        return None
    return spec[axis]


def with_sharding(abstract_eval: Callable, axes: Axes) -> Callable:
    """Wraps an abstract evaluation so results carry the operands' batch/head sharding and the
    union of their varying manual axes."""

    def rule(*avals_in, **params):
        avals_out = abstract_eval(*avals_in, **params)
        # Each factor takes the mesh axes of the first operand that has it unbroadcast.
        entries: dict[str, object] = {}
        for aval, letters in zip(avals_in, axes.operands):
            if aval.ndim != len(letters) or aval.size == 0:
                continue
            for axis, letter in enumerate(letters):
                factor = _FACTOR_OF.get(letter)
                if factor and factor not in entries and aval.shape[axis] != 1:
                    entry = _spec_entry(aval, axis)
                    if entry is not None:
                        entries[factor] = entry
        base = avals_in[0]
        if base.sharding.mesh.empty:  # no mesh: nothing to carry
            return [aval.update(sharding=None) for aval in avals_out]
        varying = frozenset().union(*(a.mat.varying for a in avals_in))
        mat = base.mat.update(varying=varying)
        return [aval.update(sharding=base.sharding.update(spec=PartitionSpec(
                    *(entries.get(_FACTOR_OF.get(c)) for c in letters))),
                            manual_axis_type=mat)
                for aval, letters in zip(avals_out, axes.results)]

    return rule


def match_varying(args: Sequence[jax.Array]) -> list[jax.Array]:
    """Casts every operand to the union of the operands' varying manual axes (``shard_map``).

    A kernel output depends on all its operands; binding a replicated key with a varying query
    must produce a varying output, and the transpose of the cast (a psum) then sums the
    gradient of a replicated operand over the devices.
    """
    varying = [core.typeof(a).mat.varying for a in args]
    union = frozenset().union(*varying)
    if not union:
        return list(args)
    return [a if v == union else jax.lax.pcast(a, tuple(sorted(union - v)), to="varying")
            for a, v in zip(args, varying)]


# ------------------------------------------------------------------------------------------
# Lowering


def _partitioned(ctx: mlir.LoweringRuleContext) -> bool:
    """Whether XLA will partition this computation over several devices (outside the manual
    axes of a shard_map)."""
    axis_context = ctx.module_context.axis_context
    num_devices = getattr(axis_context, "num_devices", None)
    if num_devices is not None:  # ShardingContext (jit)
        return num_devices > 1
    mesh = getattr(axis_context, "mesh", None)
    manual = getattr(axis_context, "manual_axes", None)
    if mesh is not None and manual is not None:  # SPMDAxisContext (shard_map)
        return any(mesh.shape[name] > 1 for name in mesh.axis_names if name not in manual)
    return False


@dataclasses.dataclass
class _View:
    """How one buffer is presented to the partitioner."""

    shape: tuple[int, ...]  # view shape
    layout: tuple[int, ...] | None  # minor-to-major of the view (None: row-major)
    codes: list[int]  # handler dims: view axis (>= 0) or constant -c-1
    factor_axes: list[tuple[int, str, int]]  # (view axis, factor, global size)
    sdy: list  # one ArrayMapping entry per view axis
    perm: tuple[int, ...] = ()  # view position of each kept original axis, in order
    physical: tuple[int, ...] = ()  # view axes, major to minor, without broadcast ones
    dropped: tuple[int, ...] = ()  # size-1 axes removed before the transpose
    tiles: tuple[tuple[int, int], ...] = ()  # (axis, reps): modular batch made whole
    broadcast_axes: tuple[int, ...] = ()  # view axes added by broadcasting
    flat: bool = False


class _Planner:
    """Builds views for one call from the avals and the primitive's axes.

    Factors: ``b`` batch, ``h`` heads, and ``u``, a size-1 axis that pads a single factor to
    ``num_batch_dims = 2`` so that buffers with no partitioned axis can still be replicated
    (the partitioner replicates buffers of rank < num_batch_dims).
    """

    def __init__(self, axes: Axes, avals_in, avals_out, heads: bool = True):
        self.axes = axes
        sizes: dict[str, int] = {}
        for aval, letters in zip(list(avals_in) + list(avals_out),
                                 axes.operands + axes.results):
            if aval.size == 0 or aval.ndim != len(letters):
                continue
            for axis, letter in enumerate(letters):
                if letter in _FACTOR_OF:
                    sizes[letter] = max(sizes.get(letter, 1), aval.shape[axis])
        n = sizes.get("n", sizes.get("k", 1))
        k = sizes.get("k", n)
        self.full = {"b": sizes.get("b", 1), "n": n, "k": k}
        factors = axes.factors
        if "h" in factors and (not heads or k == 1 or n % k):
            # One kv head (MQA) cannot be split in whole groups: partition the batch only.
            factors = factors.replace("h", "")
        self.factors = factors + "u" if len(factors) == 1 else factors
        self.group = n // k if k else 1
        self._unique = 0

    def _fresh(self) -> str:
        self._unique += 1
        return f"x{self._unique}"

    def _sdy_factor(self, factor: str, size: int):
        if factor == "u":
            return self._fresh()
        if factor == "b":
            return "b"
        if size == self.full["k"]:
            return "k"
        return CompoundFactor("k", "g")

    def _flat(self, shape: tuple[int, ...]) -> _View:
        return _View(shape=(int(np.prod(shape, dtype=np.int64)),), layout=None,
                     codes=[-d - 1 for d in shape], factor_axes=[], sdy=[self._fresh()],
                     flat=True)

    def plan(self, aval, letters: str, is_result: bool) -> _View:
        shape = tuple(aval.shape)
        if aval.size and len(letters) != aval.ndim:
            raise ValueError(f"axes {letters!r} do not match an operand of shape {shape}")
        if aval.size == 0:  # absent: rank 1, replicated
            return self._flat(shape)
        where: dict[str, int] = {}
        for axis, letter in enumerate(letters):
            factor = _FACTOR_OF.get(letter)
            if factor and factor in self.factors and factor not in where:
                where[factor] = axis
        status: dict[str, str] = {}
        for factor in self.factors:
            axis = where.get(factor)
            full = self.full[letters[axis]] if axis is not None else None
            if factor == "u":
                status[factor] = "unit"
            elif axis is None or (shape[axis] == 1 and full != 1):
                status[factor] = "broadcast"
            elif shape[axis] == full:
                status[factor] = "whole"
            elif full % shape[axis] == 0:
                status[factor] = "tile"  # read at index b % size (a vmapped, unmapped operand)
            else:
                raise ValueError(f"axis {axis} of a {shape} operand does not divide {full}")
            if is_result and status[factor] not in ("whole", "unit"):
                raise ValueError(f"result {shape} is not whole along {factor}")
        if all(s in ("broadcast", "unit") for s in status.values()):
            # Nothing to split: rank 1 < num_batch_dims, which the partitioner replicates.
            return self._flat(shape)
        dropped = tuple(where[f] for f in self.factors
                        if status[f] == "broadcast" and f in where)
        tiles = tuple((where[f], self.full[letters[where[f]]] // shape[where[f]])
                      for f in self.factors if status[f] == "tile")
        kept = [a for a in range(len(shape)) if a not in dropped]
        lead = [where[f] for f in self.factors if status[f] in ("whole", "tile")]
        # View order: one axis per factor (kept or added), then the rest in original order.
        view_axes: list[int | str] = [
            where[f] if status[f] in ("whole", "tile") else f for f in self.factors]
        view_axes += [a for a in kept if a not in lead]
        view_shape, sdy, factor_axes, added = [], [], [], []
        for v, a in enumerate(view_axes):
            if isinstance(a, str):  # added: batch, kv heads (the smaller head count) or unit
                size = {"b": self.full["b"], "h": self.full["k"], "u": 1}[a]
                view_shape.append(size)
                sdy.append(self._sdy_factor(a, size))
                if a != "u":
                    factor_axes.append((v, a, size))
                added.append(v)
                continue
            size = self.full[letters[a]] if a in lead else shape[a]
            view_shape.append(size)
            factor = _FACTOR_OF.get(letters[a])
            if a in lead:
                sdy.append(self._sdy_factor(factor, size))
                factor_axes.append((v, factor, size))
            else:
                sdy.append(self._fresh())
        view_of = {a: v for v, a in enumerate(view_axes) if not isinstance(a, str)}
        codes = [view_of[a] if a in view_of else -2 for a in range(len(shape))]  # -2: const 1
        # Physical order: broadcast axes outermost (their first slice is the original), then
        # the original axes in their original order, the unit axis next to the axis before it.
        physical = [view_of[a] for a in kept]
        if "u" in self.factors:
            unit = view_axes.index("u")
            physical.insert(physical.index(unit - 1) + 1 if unit - 1 in physical else 0, unit)
        broadcast = [v for v in added if view_axes[v] != "u"]
        layout = tuple(reversed(broadcast + physical))
        return _View(shape=tuple(view_shape), layout=layout, codes=codes,
                     factor_axes=factor_axes, sdy=sdy,
                     perm=tuple(view_of[a] for a in kept), physical=tuple(physical),
                     dropped=dropped, tiles=tiles, broadcast_axes=tuple(added))


def _encode(views_in: Sequence[_View], views_out: Sequence[_View], factors: str) -> np.ndarray:
    """The ``jaxattn_views`` attribute (layout documented in cc/ffi/shard_views.cc)."""
    views = list(views_in) + list(views_out)
    data = [1, len(views_in), len(views_out), len(factors)]
    for factor in factors:
        entries = [(i, v, size) for i, view in enumerate(views)
                   for v, f, size in view.factor_axes if f == factor]
        data.append(len(entries))
        for entry in entries:
            data.extend(entry)
    for view in views:
        data.append(len(view.codes))
        data.extend(view.codes)
    return np.asarray(data, np.int64)


def _ir_type(ctx, shape, dtype):
    return mlir.aval_to_ir_type(ctx.module_context, core.ShapedArray(shape, dtype))


def _to_view(ctx, x, aval, view: _View):
    shape, dtype = tuple(aval.shape), aval.dtype
    if view.flat:
        return hlo.reshape(_ir_type(ctx, view.shape, dtype), x) if view.shape != shape else x
    if view.dropped:
        shape = tuple(d for a, d in enumerate(shape) if a not in view.dropped)
        x = hlo.reshape(_ir_type(ctx, shape, dtype), x)
    for axis, reps in view.tiles:  # [.., m, ..] -> [.., reps, m, ..] -> [.., reps * m, ..]
        axis -= sum(1 for d in view.dropped if d < axis)
        expanded = shape[:axis] + (reps,) + shape[axis:]
        dims = [a if a < axis else a + 1 for a in range(len(shape))]
        x = hlo.broadcast_in_dim(_ir_type(ctx, expanded, dtype), x, mlir.dense_int_array(dims))
        shape = shape[:axis] + (reps * shape[axis],) + shape[axis + 1:]
        x = hlo.reshape(_ir_type(ctx, shape, dtype), x)
    # Transpose the kept axes into their view order, then add the broadcast axes.
    order = sorted(range(len(shape)), key=lambda i: view.perm[i])
    if order != list(range(len(shape))):
        shape = tuple(shape[i] for i in order)
        x = hlo.transpose(x, mlir.dense_int_array(order))
    if view.broadcast_axes:
        dims = [v for v in range(len(view.shape)) if v not in view.broadcast_axes]
        x = hlo.broadcast_in_dim(_ir_type(ctx, view.shape, dtype), x,
                                 mlir.dense_int_array(dims))
    return x


def _from_view(ctx, x, aval, view: _View):
    """A result view back to the original shape: a transpose into its physical order (a
    row-major array afterwards), then a reshape that drops the unit axis (a bitcast)."""
    if list(view.physical) != sorted(view.physical):
        x = hlo.transpose(x, mlir.dense_int_array(view.physical))
    if len(view.shape) != aval.ndim:
        x = hlo.reshape(_ir_type(ctx, aval.shape, aval.dtype), x)
    return x


def _heads_known_unsharded(avals_in, axes: Axes) -> bool:
    """Whether the types say no head axis is split: every mesh axis explicit (or manual) and
    no head axis sharded. Then batch-only views need no result copies (bitcasts only)."""
    for aval, letters in zip(avals_in, axes.operands):
        if aval.size == 0 or aval.ndim != len(letters):
            continue
        mesh = aval.sharding.mesh
        if mesh.empty or any(t not in (AxisType.Explicit, AxisType.Manual)
                             for t in mesh.axis_types):
            return False
        if any(_FACTOR_OF.get(c) == "h" and _spec_entry(aval, axis) is not None
               for axis, c in enumerate(letters)):
            return False
    return True


def partitionable_lowering(target: str, axes: Axes,
                           aliases: dict[int, int] | None = None) -> Callable:
    """The lowering of a primitive whose custom call XLA may split along batch and heads.

    ``aliases`` {operand: result}: pairs XLA may give one buffer (the kernel updates the
    operand in place; XLA copies it first unless it is donated or dead), applied where the
    two have one shape and dtype."""

    def matching_aliases(ctx: mlir.LoweringRuleContext) -> dict[int, int]:
        return {i: o for i, o in (aliases or {}).items()
                if ctx.avals_in[i].shape == ctx.avals_out[o].shape
                and ctx.avals_in[i].dtype == ctx.avals_out[o].dtype}

    def lowering(ctx: mlir.LoweringRuleContext, *args, **attrs):
        plain = jax.ffi.ffi_lowering(target, operand_output_aliases=matching_aliases(ctx))
        if not _partitioned(ctx) or any(
                not core.is_constant_shape(a.shape) for a in (*ctx.avals_in, *ctx.avals_out)):
            return plain(ctx, *args, **attrs)
        planner = _Planner(axes, ctx.avals_in, ctx.avals_out,
                           heads=not _heads_known_unsharded(ctx.avals_in, axes))
        if not planner.factors:
            return plain(ctx, *args, **attrs)
        views_in = [planner.plan(a, l, False) for a, l in zip(ctx.avals_in, axes.operands)]
        views_out = [planner.plan(a, l, True) for a, l in zip(ctx.avals_out, axes.results)]
        operands = [_to_view(ctx, x, a, v) for x, a, v in zip(args, ctx.avals_in, views_in)]
        avals_in = [core.ShapedArray(v.shape, a.dtype) for a, v in zip(ctx.avals_in, views_in)]
        avals_out = [core.ShapedArray(v.shape, a.dtype)
                     for a, v in zip(ctx.avals_out, views_out)]
        extra = {"mhlo.frontend_attributes":
                 mlir.ir_attribute({"num_batch_dims": str(len(planner.factors))})}
        if jax_config.use_shardy_partitioner.value:
            sizes = {}
            mapped = [f for v in views_in + views_out for f in v.sdy]
            if any(isinstance(f, CompoundFactor) for f in mapped):
                sizes["g"] = planner.group
                if "k" not in mapped:  # k only inside (k g): Shardy needs its size
                    sizes["k"] = planner.full["k"]
            rule = SdyShardingRule(tuple(ArrayMapping(*v.sdy) for v in views_in),
                                   tuple(ArrayMapping(*v.sdy) for v in views_out), **sizes)
            extra["sdy.sharding_rule"] = sdy_sharding_rule_to_mlir(
                rule, [_ir_type(ctx, a.shape, a.dtype) for a in avals_in],
                [_ir_type(ctx, a.shape, a.dtype) for a in avals_out])
        attrs[VIEWS_ATTR] = _encode(views_in, views_out, planner.factors)
        view_ctx = ctx.replace(avals_in=avals_in, avals_out=avals_out)
        call = jax.ffi.ffi_lowering(
            target, operand_layouts=[v.layout for v in views_in],
            result_layouts=[v.layout for v in views_out], extra_attributes=extra,
            operand_output_aliases={i: o for i, o in matching_aliases(view_ctx).items()
                                    if views_in[i].layout == views_out[o].layout})
        results = call(view_ctx, *operands, **attrs)
        return [_from_view(ctx, x, a, v)
                for x, a, v in zip(results, ctx.avals_out, views_out)]

    return lowering


