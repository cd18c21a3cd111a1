import sys
from pathlib import Path

# Make tests/fixtures.py importable as `fixtures` and the repo root (CLI scripts) importable.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
