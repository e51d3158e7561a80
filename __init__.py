"""ReconX for ComfyUI: sparse views -> DUSt3R global alignment -> structure-guided video interpolation ->
confidence mapping -> confidence-aware 3D Gaussian Splatting, as separate nodes."""

import os
import sys

# reconx_core is imported by absolute name from nodes/; make the pack's folder importable. Appended, not
# prepended, so nothing here can shadow ComfyUI's own modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
