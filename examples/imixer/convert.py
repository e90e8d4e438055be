"""Converts a checkpoint of the reference iMixer implementation to this example's safetensors weights.

    python examples/imixer/convert.py reference.pth imixer_s16_cifar10.safetensors \\
        --model imixer_s16_224 --num-classes 10 --reference-iterations 2

The file is read with ``torch.load(weights_only=True)``; the keys are mapped by
:func:`imixer.convert_reference_state_dict` and checked by loading them (strictly) into the named model
before anything is written. Evaluate the result with
``train.py --eval-only --resume <out>.safetensors --model ... --reference-iterations n``.
Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.utils import ParseKwargs

if __package__ in (None, ""):  # run as a script: import the package from the repository root instead
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from examples.common import OneLineArgumentParser, UsageError, first_line
from examples.imixer import imixer as imixer_model
from examples.imixer.checkpoints import atomic_write


def convert(
    source: Path, target: Path, model_name: str, num_classes: int, reference_iterations: int, **model_kwargs: Any
) -> int:
    """Reads, converts, validates and writes; returns the number of tensors written.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``embed_dim``, ``hidden_ratio`` for a reference run
    trained with other shapes; the reference train.py defaults to hidden_ratio 1).
    """
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling failures come in many types; all mean "not a usable checkpoint"
        raise UsageError(f"cannot read {source}: {first_line(error)}") from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{source} does not hold a state dict")
    state_dict = imixer_model.convert_reference_state_dict(checkpoint)
    try:
        net = timm.create_model(
            model_name, num_classes=num_classes, reference_iterations=reference_iterations, **model_kwargs
        )
    except (TypeError, ValueError) as error:
        raise UsageError(f"cannot build {model_name}: {error}") from None
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise UsageError(f"{source} does not fit {model_name}: {first_line(error)}") from None
    tensors = {key: value.contiguous() for key, value in net.state_dict().items()}
    metadata = {"model": model_name, "source": source.name, "reference_iterations": str(reference_iterations)}
    atomic_write(target, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata))
    return len(tensors)


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 2 with one line on bad input."""
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0], raise_errors=True)
    parser.add_argument("source", type=Path, help="reference checkpoint (.pth)")
    parser.add_argument("target", type=Path, help="output .safetensors")
    parser.add_argument("--model", default="imixer_s16_224")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--reference-iterations", type=int, default=2)
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="key=value")
    try:
        try:
            args = parser.parse_args(argv)
        except ValueError as error:  # a --model-kwargs item without "="
            raise UsageError(f"bad --model-kwargs item ({error}); use key=value") from None
        if not args.model.startswith("imixer") or not timm.is_model(args.model):
            raise UsageError(f"unknown iMixer model {args.model!r}")
        count = convert(
            args.source, args.target, args.model, args.num_classes, args.reference_iterations, **args.model_kwargs
        )
    except UsageError as error:
        print(f"convert.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} tensors to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
