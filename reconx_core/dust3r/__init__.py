"""DUSt3R stage: the network, checkpoint loading, preprocessing and batched pairwise inference.

Public API (see ../shared/DESIGN.md):
- `load_dust3r(path_or_state_dict, device="cpu", dtype=None) -> Dust3R`
- `Dust3R.forward(img1, img2, true_shape1=None, true_shape2=None) -> (pred1, pred2)`
- `prepare_images(images, size=512, square_ok=False) -> (N, 3, H', W')` in [0, 1]
- `make_pair_edges(n_views, graph="complete", symmetrize=True) -> (E, 2) long`
- `infer_pairs(model, images, graph="complete", batch_size=8, callback=None) -> PairPredictions`
"""

from .checkpoint import infer_config, load_dust3r, normalize_state_dict, read_checkpoint
from .model import Dust3R, Dust3RConfig
from .pairs import infer_pairs, make_pair_edges
from .preprocess import prepare_images

__all__ = ["Dust3R", "Dust3RConfig", "load_dust3r", "read_checkpoint", "normalize_state_dict", "infer_config",
           "prepare_images", "make_pair_edges", "infer_pairs"]
