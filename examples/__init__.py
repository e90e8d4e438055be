"""Examples built on implicitlayers; importable from the repository root (``from examples.imixer import imixer``)."""
