"""Miniature random-weight models of every network, for smoke runs (`make demo ARGS=--tiny`) and tests.

Testing support: the library itself never imports this module.

They have the real architectures at a few MB each, load through the same code as the real checkpoints
(`load_dust3r`, `load_video_model`, `load_structure_branch`), and produce meaningless pictures: a run with them
checks the plumbing, never the reconstruction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file

TINY_DUST3R = "tiny_224_dpt_random.safetensors"
TINY_VIDEO = "tiny_dynamicrafter_random.safetensors"
TINY_BRANCH = "tiny_structure_branch_random.safetensors"
TINY_VIEWCRAFTER = "tiny_viewcrafter_random.safetensors"


def tiny_dust3r(seed: int = 0):
    """A DUSt3R with the DPT head at the size of shared/fixtures' tiny_dpt (about 1M parameters, 224 preprocessing).

    Random weights, except that each head's last 1x1 conv is damped and biased so that the point maps lie in
    front of the camera (depth about 3.5) with confidences about 3.7: fully random heads put points behind the
    camera and give no usable geometry, which would stop a smoke run at the first alignment.
    """
    from ..dust3r import Dust3R, Dust3RConfig

    torch.manual_seed(seed)
    config = Dust3RConfig(enc_embed_dim=96, enc_depth=2, enc_num_heads=4, dec_embed_dim=32, dec_depth=10,
                          dec_num_heads=4, head_type="dpt", dpt_feature_dim=32, dpt_last_dim=16,
                          dpt_layer_dims=(16, 32, 48, 64), image_size=224)
    model = Dust3R(config).eval()
    with torch.no_grad():
        for head in (model.downstream_head1, model.downstream_head2):
            last = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # (x, y, z, conf) out
            last.weight.mul_(0.05)
            last.bias.copy_(torch.tensor([0.0, 0.0, 1.5, 1.0]))
    return model


def write_tiny_models(models_dir: Union[str, Path], seed: int = 0) -> dict:
    """Write the tiny models into `models_dir`/dust3r and `models_dir`/reconx (the pack's model folders).

    Returns {"dust3r": path, "video": path, "structure_branch": path, "viewcrafter": path}. The structure branch
    gets non-zero gates (alpha_struct = 0.5) so that structure guidance is exercised. The tiny ViewCrafter is the
    tiny DynamiCrafter's architecture with other random weights, saved as backbone viewcrafter_25_512 with
    ViewCrafter's fs 10 and 4-frame segments (its config in the metadata; a real ViewCrafter has 25).
    """
    from ..video import build_video_model, save_structure_branch, save_video_model, tiny_config

    root = Path(models_dir)
    (root / "dust3r").mkdir(parents=True, exist_ok=True)
    (root / "reconx").mkdir(parents=True, exist_ok=True)
    paths = {"dust3r": root / "dust3r" / TINY_DUST3R, "video": root / "reconx" / TINY_VIDEO,
             "structure_branch": root / "reconx" / TINY_BRANCH, "viewcrafter": root / "reconx" / TINY_VIEWCRAFTER}
    dust3r = tiny_dust3r(seed)
    # The DPT head registers each scratch conv under two names; files keep one (the loader accepts either).
    state = {k: v.contiguous() for k, v in dust3r.state_dict().items() if ".scratch.layer_rn." not in k}
    save_file(state, str(paths["dust3r"]), metadata={"enc_num_heads": "4", "dec_num_heads": "4"})
    video = build_video_model(tiny_config(), structure_encoder=True, seed=seed)
    with torch.no_grad():
        for name, param in video.unet.named_parameters():
            if name.endswith("alpha_struct"):
                param.fill_(0.5)
    save_video_model(video, paths["video"])
    save_structure_branch(video, paths["structure_branch"])
    config = tiny_config()
    config["unet"]["default_fs"] = 10
    config.update(backbone="viewcrafter_25_512", frames=4, frame_stride=10)
    save_video_model(build_video_model(config, seed=seed + 1), paths["viewcrafter"])
    return paths
