"""Makes examples/imixer importable as the top-level modules its scripts use (model, data, train)."""

import sys
from pathlib import Path

IMIXER_DIR = Path(__file__).resolve().parents[2] / "examples" / "imixer"
if str(IMIXER_DIR) not in sys.path:
    sys.path.insert(0, str(IMIXER_DIR))
