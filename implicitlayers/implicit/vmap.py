"""``torch.func.vmap`` for the primitive's Functions: fold the mapped dimension into the batch (samples
are independent) and solve once, or solve once per index where a shared input is mapped; and the legacy
batching of ``torch.autograd.grad(..., is_grads_batched=True)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .problem import Problem

__all__ = ["unbatch_legacy", "vmap_rule"]


def vmap_rule(function: type[torch.autograd.Function], info, in_dims, problem: Problem, *args: Tensor):
    """The ``vmap`` staticmethod of the primitive's Functions (``args`` start with z or z0)."""
    per_sample = function.per_sample(problem)
    dims = in_dims[1:]
    size = info.batch_size
    if all(d is None or sample for d, sample in zip(dims, per_sample, strict=True)):
        batch = _rows(args[0], dims[0])  # args[0] is z (or z0): always per-sample
        folded = [_fold(a, d, size) if sample else a for a, d, sample in zip(args, dims, per_sample, strict=True)]
        out = function.apply(problem, *folded)
        return out.reshape(size, batch, *out.shape[1:]), 0
    # An input shared by all samples (a weight) differs along the mapped dimension: one solve each.
    outputs = [
        function.apply(problem, *[a if d is None else a.select(d, index) for a, d in zip(args, dims, strict=True)])
        for index in range(size)
    ]
    return torch.stack(outputs), 0


def _rows(a: Tensor, dim: int | None) -> int:
    """Samples in ``a`` (dim 0 of the unmapped tensor)."""
    return a.shape[0] if dim is None else a.movedim(dim, 0).shape[1]


def _fold(a: Tensor, dim: int | None, size: int) -> Tensor:
    """(V, B, ...) → (V·B, ...), with the mapped dim moved first (or created by repetition)."""
    a = a.expand(size, *a.shape) if dim is None else a.movedim(dim, 0)
    return a.reshape(size * a.shape[1], *a.shape[2:])


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda tensor: False)


def unbatch_legacy(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """Lets ``backward`` run under ``torch.autograd.grad(..., is_grads_batched=True)``.

    That option batches the incoming gradients with PyTorch's legacy vmap, which knows nothing of
    autograd.Function vmap rules (and the solver loop cannot be traced by it). The gradients are
    unwrapped to plain (V, ...) tensors, the backward runs under :func:`torch.func.vmap` (which uses
    the rules above), and the results are wrapped back.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads: Tensor) -> tuple:
        legacy = [isinstance(g, Tensor) and _is_legacy_batched(g) for g in grads]
        if not any(legacy):
            return backward(ctx, *grads)
        level = torch._C._vmapmode_increment_nesting() - 1  # the level of the vmap we are inside
        torch._C._vmapmode_decrement_nesting()
        size = torch._remove_batch_dim(grads[legacy.index(True)], level, 1, 0).shape[0]
        physical = [
            torch._remove_batch_dim(g, level, size, 0) if is_ else g for g, is_ in zip(grads, legacy, strict=True)
        ]
        positions: list[int] = []

        def tensors_only(*gs: Tensor) -> tuple[Tensor, ...]:
            outputs = backward(ctx, *gs)
            positions[:] = [i for i, out in enumerate(outputs) if isinstance(out, Tensor)]
            return tuple(outputs[i] for i in positions)

        batched = torch.func.vmap(tensors_only, in_dims=tuple(0 if is_ else None for is_ in legacy))(*physical)
        outputs: list[Tensor | None] = [None] * (len(ctx.needs_input_grad))
        for position, out in zip(positions, batched, strict=True):
            outputs[position] = torch._add_batch_dim(out, 0, level)
        return tuple(outputs)

    return wrapper
