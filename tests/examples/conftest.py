"""The examples are imported as the package ``examples`` from the repository root (pytest's ``pythonpath``)."""
