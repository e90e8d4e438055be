"""Tensors that f reads without receiving them as inputs (closures): detect them, or raise.

Inside a ``torch.autograd.Function`` a captured tensor is a constant, so its derivative would be
dropped without a word. On the plain reverse-mode path a hook on one recorded graph of f gives it
its exact first-order gradient; under torch.func transforms and forward mode, where no hook can,
the primitive raises instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .binding import bind
from .linear import Adjoint
from .problem import ForwardRecord, Problem, is_transformed

__all__ = ["CAPTURE_MESSAGE", "TRANSFORM_CAPTURE_MESSAGE", "check_captures", "checked", "hook_captured"]

TRANSFORM_CAPTURE_MESSAGE = (
    "f captures a tensor that a torch.func transform (or forward-mode AD) is differentiating or batching; "
    "pass every tensor f uses as an explicit input (a layer passes its module's parameters and buffers, and x, "
    "for you: store other tensors as parameters or buffers, or feed them through x)"
)

CAPTURE_MESSAGE = (
    "f reads tensors that require grad without receiving them as inputs (a closure); their exact "
    "first-order gradient is supported, {what} are not. Register them as parameters or buffers of the "
    "module, or pass them as inputs to implicit_fixed_point"
)


def checked(fz: Tensor) -> Tensor:
    """``fz``, unless it carries a transform's wrapper (f captured a transformed tensor): then raises."""
    if is_transformed(fz):
        raise RuntimeError(TRANSFORM_CAPTURE_MESSAGE)
    return fz


def check_captures(problem: Problem, z0: Tensor, inputs: Sequence[Tensor]) -> None:
    """Under a torch.func transform or forward-mode AD, raises if f reads a tracked tensor it is not given.

    One evaluation of f on detached inputs tells. (On the plain reverse-mode path the forward's
    first evaluation tells instead, and :func:`hook_captured` serves it.)
    """
    functorch = torch._C._functorch.maybe_current_level() is not None
    if not functorch and forward_ad._current_level < 0:
        return
    z, detached = z0.detach(), [i.detach() for i in inputs]
    probe = bind(problem.f, detached, lambda bound: bound(z))
    if functorch and _depends_on_captures(probe, [z, *detached]):
        raise RuntimeError(TRANSFORM_CAPTURE_MESSAGE)
    if forward_ad.unpack_dual(probe).tangent is not None:
        raise RuntimeError(CAPTURE_MESSAGE.format(what="forward-mode derivatives"))


def _depends_on_captures(probe: Tensor, detached: Sequence[Tensor]) -> bool:
    """Whether ``probe``, f evaluated on ``detached`` inputs, carries anything a transform tracks.

    Detaching an input detaches it at every level of the transform stack, so every derivative the
    probe carries, at any level, comes from a tensor f captured: a ``requires_grad`` at some
    ``grad``/``vjp`` level or below all transforms (a plain autograd leaf read under ``vmap``, which a
    BatchedTensor's own ``requires_grad`` does not show), or a tangent at a ``jvp`` level. So is a
    batch dimension at a ``vmap`` level where no input has one (a captured mapped tensor).
    """
    functorch = torch._C._functorch
    batched_levels = set()
    for tensor in detached:
        while functorch.is_functorch_wrapped_tensor(tensor):
            if functorch.is_batchedtensor(tensor):
                batched_levels.add(functorch.maybe_get_level(tensor))
            tensor = functorch.get_unwrapped(tensor)
    tensor = probe
    while True:
        if tensor.requires_grad or forward_ad.unpack_dual(tensor).tangent is not None:
            return True
        if not functorch.is_functorch_wrapped_tensor(tensor):
            return False
        if functorch.is_batchedtensor(tensor) and functorch.maybe_get_level(tensor) not in batched_levels:
            return True
        tensor = functorch.get_unwrapped(tensor)


def hook_captured(problem: Problem, record: ForwardRecord, out: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """First-order gradients for an f that captures tensors requiring grad (they are not inputs).

    The captured tensors are reachable only through a recorded graph of f, so a hook on that graph
    replaces the incoming gradient g by the gradient mode's adjoint u, as a hand-written IFT does.
    That is exact to first order; higher orders and forward mode raise, since the hook cannot give them.
    """
    z_leaf = record.z_best.detach().requires_grad_()
    with torch.enable_grad():
        carrier = bind(problem.f, inputs, lambda f: f(z_leaf))
    if forward_ad.unpack_dual(carrier).tangent is not None:
        raise RuntimeError(CAPTURE_MESSAGE.format(what="forward-mode derivatives"))

    def solve_adjoint(grad: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError(CAPTURE_MESSAGE.format(what="higher-order derivatives (create_graph=True)"))
        adjoint: Adjoint = Adjoint(problem, record, z_leaf, carrier, grad)
        return problem.gradient.adjoint(adjoint)

    hooked = carrier.view_as(carrier)  # on a view: the adjoint's VJPs start at carrier and skip the hook
    hooked.register_hook(solve_adjoint)
    return out.detach() + (hooked - hooked.detach())
