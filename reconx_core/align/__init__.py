"""Global alignment of DUSt3R pair predictions into one Scene (fast, batched, confidence-weighted).

Entry point: `align_views(pairs, niter=300, lr=0.01, schedule="cosine", init="mst", min_conf_thr=3.0, ...)`.
Also: `confidence_masks` (official `get_masks`), `clean_pointcloud` / `clean_scene`.
"""

from .global_align import align_views, image_confidence
from .pointcloud import clean_pointcloud, clean_scene, confidence_masks

__all__ = ["align_views", "image_confidence", "clean_pointcloud", "clean_scene", "confidence_masks"]
