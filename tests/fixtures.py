"""The one place tests find the shared parity fixtures (../shared/fixtures, see its README).

RECONX_FIXTURES overrides the folder. A missing folder is an error, not a skip: the parity tests are the proof
that official checkpoints load, so CI must fail loudly if the data is not where it should be.
"""

import json
import os
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("RECONX_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(f"fixture {name} not found in {FIXTURES}; set RECONX_FIXTURES to the shared/fixtures folder")
    return path


def load_tensors(name: str) -> dict:
    """All tensors of a fixture's .safetensors file, on the CPU."""
    return load_file(str(fixture_path(name)))


def load_json(name: str) -> dict:
    return json.loads(fixture_path(name).read_text())
