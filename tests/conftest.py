"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default: ``ci`` under CI, else ``dev``).

- ``ci``: derandomised (reproducible in CI), few examples, no deadline (shared 2-core machines).
- ``dev``: random seeds, a few more examples.
- ``thorough``: many examples, for a release or after touching a solver.
"""

import os

import torch
from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=50, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Small problems are dominated by thread start-up; one thread keeps runs fast and repeatable.
torch.set_num_threads(1)
