"""The invertible residual flow example: ``examples/flows/train.py`` (the script)."""
