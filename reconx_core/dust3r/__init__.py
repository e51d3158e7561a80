"""DUSt3R stage: the network, checkpoint loading, preprocessing and batched pairwise inference.

MASt3R checkpoints load as the same `Dust3R` class (head type "catmlp+dpt"): a drop-in for point maps and
confidences; its descriptors are returned by `Dust3R.forward` but not used by the pipeline.

Public API (see ../shared/DESIGN.md):
- `load_dust3r(path_or_state_dict, device="cpu", dtype=None, config=None) -> Dust3R`: .pth / .safetensors files,
  Hugging Face folders (config.json + model.safetensors), DUSt3R and MASt3R
- `Dust3R.forward(img1, img2, true_shape1=None, true_shape2=None) -> (pred1, pred2)`
- `prepare_images(images, size=512, square_ok=False) -> (N, 3, H', W')` in [0, 1]
- `prepare_views([(3, H, W), ...], size=512) -> ((N, 3, H', W'), cut)`: photos of different sizes, one shape
- `make_pair_edges(n_views, graph="complete", symmetrize=True) -> (E, 2) long`
- `infer_pairs(model, images, graph="complete", batch_size=8, callback=None) -> PairPredictions`
"""

from .checkpoint import (infer_config, load_dust3r, normalize_state_dict, parse_constructor_call, read_checkpoint,
                         read_config_json, resolve_checkpoint_files)
from .model import Dust3R, Dust3RConfig
from .pairs import infer_pairs, make_pair_edges
from .preprocess import prepare_images, prepare_views

from .weights_io import identify_model, read_weights

__all__ = ["Dust3R", "Dust3RConfig", "load_dust3r", "read_checkpoint", "normalize_state_dict", "infer_config",
           "read_config_json", "parse_constructor_call", "resolve_checkpoint_files", "prepare_images", "prepare_views",
           "make_pair_edges", "infer_pairs", "read_weights", "identify_model"]
