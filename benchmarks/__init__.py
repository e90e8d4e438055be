"""The benchmarks behind the library's claims, each run as ``python -m benchmarks.<name>`` (see its README)."""
