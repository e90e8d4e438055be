"""Explicit derivatives of f(z, *inputs), by :mod:`torch.func`: differentiable, and valid inside every transform.

Every derivative the implicit function theorem needs is built from these VJPs (a JVP is the VJP of
a VJP), so the primitive composes with reverse mode of any order, forward mode and torch.func.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .binding import PureFunction

__all__ = [
    "jacobian_product",
    "jvp",
    "jvp_inputs",
    "second_order_jvp",
    "second_order_vjp",
    "select",
    "transposed_jacobian_product",
    "vjp_inputs",
]


def select(f: PureFunction, z: Tensor, inputs: Sequence[Tensor], positions: list[int]) -> Callable[..., Tensor]:
    """``(*chosen) ↦ f(z, *inputs with inputs[positions] = chosen)``."""

    def partial(*chosen: Tensor) -> Tensor:
        full = list(inputs)
        for position, value in zip(positions, chosen, strict=True):
            full[position] = value
        return f(z, *full)

    return partial


def vjp_inputs(f: PureFunction, z: Tensor, inputs: Sequence[Tensor], cotangent: Tensor, needed: Sequence[bool]):
    """(∂f/∂inputs)ᵀ cotangent at (z, inputs), ``None`` where not ``needed``."""
    positions = [i for i, need in enumerate(needed) if need]
    grads: list[Tensor | None] = [None] * len(inputs)
    if positions:
        _, pull = torch.func.vjp(select(f, z, inputs, positions), *[inputs[i] for i in positions])
        for position, grad in zip(positions, pull(cotangent.to(z.dtype)), strict=True):
            grads[position] = grad
    return grads


def jvp_inputs(f: PureFunction, z: Tensor, inputs: Sequence[Tensor], tangents: Sequence[Tensor | None]) -> Tensor:
    """(∂f/∂inputs) · tangents at (z, inputs); inputs without a tangent are held fixed."""
    positions = [i for i, t in enumerate(tangents) if t is not None]
    if not positions:
        return torch.zeros_like(z)
    primals = tuple(inputs[i] for i in positions)
    return jvp(select(f, z, inputs, positions), primals, [tangents[i] for i in positions])


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """The directional derivative of ``fn`` at ``primals`` along ``tangents``, by two VJPs.

    J t is the VJP, with cotangent t, of the linear map w ↦ Jᵀ w. Reverse mode only: forward-mode
    AD is switched off inside autograd.Function methods and cannot be nested in
    ``torch.autograd.forward_ad``, while this composes with every transform.
    """
    out, pull = torch.func.vjp(fn, *primals)
    _, pull_linear = torch.func.vjp(pull, torch.zeros_like(out))
    (product,) = pull_linear(tuple(t.to(p.dtype) for p, t in zip(primals, tangents, strict=True)))
    return product


def transposed_jacobian_product(f: PureFunction, a: Tensor) -> Callable[..., Tensor]:
    """``(z, *inputs) ↦ J_z(z, inputs)ᵀ a``, as a function to differentiate in (z, inputs)."""

    def product(z: Tensor, *inputs: Tensor) -> Tensor:
        _, pull = torch.func.vjp(lambda y: f(y, *inputs), z)
        return pull(a.to(z.dtype))[0]

    return product


def jacobian_product(f: PureFunction, t: Tensor) -> Callable[..., Tensor]:
    """``(z, *inputs) ↦ J_z(z, inputs) t``."""

    def product(z: Tensor, *inputs: Tensor) -> Tensor:
        return jvp(lambda y: f(y, *inputs), (z,), (t.to(z.dtype),))

    return product


def second_order_vjp(f: PureFunction, a: Tensor, b: Tensor, z: Tensor, inputs: Sequence[Tensor], needed):
    """∂/∂(z, inputs) ⟨a, J_z(z, inputs) b⟩ = the VJP of (z, inputs) ↦ J_zᵀ a with cotangent b.

    The piece of every second derivative of a fixed point that involves how J_z moves. Returns
    ``(grad_z, grads_inputs)``, ``None`` where not ``needed`` (``needed[0]`` is z's flag).
    """
    positions = [i for i, need in enumerate(needed[1:]) if need]
    product = transposed_jacobian_product(f, a)
    _, pull = torch.func.vjp(
        lambda y, *chosen: select(product, y, inputs, positions)(*chosen), z, *[inputs[i] for i in positions]
    )
    grad_z, *chosen_grads = pull(b.to(z.dtype))
    grads: list[Tensor | None] = [None] * len(inputs)
    for position, grad in zip(positions, chosen_grads, strict=True):
        grads[position] = grad
    return (grad_z if needed[0] else None), grads


def second_order_jvp(product: Callable[..., Tensor], z: Tensor, inputs, z_tangent, input_tangents) -> Tensor:
    """Directional derivative of ``product(z, *inputs)`` along (z_tangent, input_tangents)."""
    positions = [i for i, t in enumerate(input_tangents) if t is not None]
    if z_tangent is None and not positions:
        return torch.zeros_like(z)
    z_tangent = torch.zeros_like(z) if z_tangent is None else z_tangent

    def moving(y: Tensor, *chosen: Tensor) -> Tensor:
        return select(product, y, inputs, positions)(*chosen)

    primals = (z, *[inputs[i] for i in positions])
    tangents = (z_tangent, *[input_tangents[i] for i in positions])
    return jvp(moving, primals, tangents)
