"""Optional integrations with other libraries.

Nothing here is imported by :mod:`implicitlayers` itself, and every module imports its third-party
dependency lazily, so the core package never requires them:

- :mod:`implicitlayers.contrib.torchdeq`: registers TorchDEQ's solvers (``pip install torchdeq``, or the
  ``bench`` extra) as ``"torchdeq.anderson"``, ``"torchdeq.broyden"`` and ``"torchdeq.fixed_point_iter"``.
"""
