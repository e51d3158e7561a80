"""Testing support shared by the tests, the smoke demo (`make demo ARGS=--tiny`) and `scripts/evaluate.py --tiny`.

Nothing in the library imports this package: it builds random-weight miniatures of the real networks, which
exercise the code paths and produce meaningless pictures.
"""

from .tiny_models import TINY_BRANCH, TINY_DUST3R, TINY_VIDEO, TINY_VIEWCRAFTER, tiny_dust3r, write_tiny_models

__all__ = ["TINY_BRANCH", "TINY_DUST3R", "TINY_VIDEO", "TINY_VIEWCRAFTER", "tiny_dust3r", "write_tiny_models"]
