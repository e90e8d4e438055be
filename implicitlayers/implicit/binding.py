"""A module's computation as a pure function of explicit tensors, and binding a pure function to its inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModuleFunction", "PureFunction", "bind"]

PureFunction = Callable[..., Tensor]


class ModuleFunction:
    """A module's computation as a pure function of explicit tensors, for the primitive.

    ``fn(z, x)`` may use ``module`` freely; the tensors ``module`` holds become explicit inputs, so
    autograd, :mod:`torch.func` transforms and other threads see no hidden state. Parametrised
    tensors (spectral norm) are computed once, by :meth:`tensors`, and passed in computed form: the
    map is fixed during a solve and the power iteration advances once per call of :meth:`tensors`.

    Args:
        module: The module whose parameters and buffers ``fn`` reads.
        fn: ``fn(z, x) -> f(z, x)``.
    """

    def __init__(self, module: nn.Module, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.module = module
        self.fn = fn
        self.names: list[str] = []

    def tensors(self) -> list[Tensor]:
        """The module's effective tensors (computed parametrisations, parameters, buffers); sets ``names``."""
        named: dict[str, Tensor] = {}
        for prefix, sub in self.module.named_modules():
            for name in getattr(sub, "parametrizations", {}):
                named[f"{prefix}.{name}" if prefix else name] = getattr(sub, name)
        for name, tensor in [*self.module.named_parameters(), *self.module.named_buffers()]:
            # A parametrisation's own tensors (original, power-iteration vectors) are consumed above.
            if "parametrizations." not in f".{name}":
                named[name] = tensor
        self.names = list(named)
        return list(named.values())

    def __call__(self, z: Tensor, x: Tensor, *tensors: Tensor) -> Tensor:
        return self.bind((x, *tensors), lambda f: f(z))

    def bind(self, inputs: Sequence[Tensor], body: Callable[[Callable[..., Tensor]], Any]) -> Any:
        """Runs ``body(z ↦ f(z, *inputs))`` with the module's tensors swapped once for ``inputs[1:]``.

        The bound function also takes replacement inputs, ``f(z, x_rows, *tensors)``, for evaluating
        a subset of the samples; the module's tensors stay those swapped in.
        """
        x, *tensors = inputs
        named = dict(zip(self.names, tensors, strict=True))
        parametrized = [name for name in named if _parametrization_of(self.module, name) is not None]
        plain = {f"module.{name}": tensor for name, tensor in named.items() if name not in parametrized}
        runner = _Runner(self.module, lambda: body(lambda z, *replaced: self.fn(z, replaced[0] if replaced else x)))
        with _computed_parametrizations(self.module, {name: named[name] for name in parametrized}):
            return torch.func.functional_call(runner, plain, (), strict=False)


class _Runner(nn.Module):
    """Holds ``module`` as a child so that functional_call swaps its tensors while ``body`` runs."""

    def __init__(self, module: nn.Module, body: Callable[[], Any]) -> None:
        super().__init__()
        self.module = module
        self.body = body

    def forward(self) -> Any:
        return self.body()


def _parametrization_of(module: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """``(submodule, attribute)`` if ``name`` is a parametrised tensor of ``module``."""
    prefix, _, attribute = name.rpartition(".")
    sub = module.get_submodule(prefix) if prefix else module
    if attribute in getattr(sub, "parametrizations", {}):
        return sub, attribute
    return None


class _Computed(nn.Module):
    """Stands in for a ParametrizationList: returns the already computed tensor."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self) -> Tensor:
        return self.value


@contextlib.contextmanager
def _computed_parametrizations(module: nn.Module, computed: dict[str, Tensor]):
    """Makes each parametrised attribute in ``computed`` return the given tensor while inside.

    ``functional_call`` would assign such an attribute through the parametrisation's
    ``right_inverse``, which rewrites the free parameter; swapping the parametrisation list for a
    constant touches nothing global and only this module (so independent modules may run in
    independent threads).
    """
    swapped = []
    try:
        for name, value in computed.items():
            sub, attribute = _parametrization_of(module, name)
            swapped.append((sub, attribute, sub.parametrizations[attribute]))
            sub.parametrizations[attribute] = _Computed(value)
        yield
    finally:
        for sub, attribute, original in reversed(swapped):
            sub.parametrizations[attribute] = original


def bind(f: PureFunction, inputs: Sequence[Tensor], body: Callable[[Callable[..., Tensor]], Any]) -> Any:
    """``body(bound)`` with ``bound(z) = f(z, *inputs)`` (and ``bound(z, *other_inputs)`` for a subset)."""
    if isinstance(f, ModuleFunction):
        return f.bind(inputs, body)
    return body(lambda z, *replaced: f(z, *(replaced or inputs)))
