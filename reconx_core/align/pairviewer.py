"""The two-view fast path: DUSt3R's PairViewer, with no optimisation at all."""

from __future__ import annotations

import logging

import torch

from ..geometry import transform_points
from .geometry import estimate_focal_weiszfeld
from .pnp import pnp_camera_pose

log = logging.getLogger(__name__)


@torch.no_grad()
def pair_viewer(edges, pts_i, pts_j_in_i, conf_i, conf_j, im_conf, min_conf_thr: float = 3.0):
    """Cameras and depths of two views straight from the symmetric pair (official `PairViewer`).

    edges: (2, 2) long holding (0, 1) and (1, 0); pts_*: (2, H, W, 3); conf_*: (2, H, W); im_conf: (2, H, W).
    Each view's focal is the Weiszfeld estimate from its own point map; each view's pose relative to the other
    comes from PnP of its points as predicted in the other's frame. The frame of the more confident edge's first
    view becomes the world. Returns cam_to_world (2, 4, 4), focals (2,), depths (2, H, W), all float32.
    """
    index = {(int(i), int(j)): e for e, (i, j) in enumerate(edges.tolist())}
    device = pts_i.device
    confs, focals, rel_poses = [], [], []
    for i in range(2):
        e = index[(i, 1 - i)]
        confs.append(float(conf_i[e].mean() * conf_j[e].mean()))
        focal = float(estimate_focal_weiszfeld(pts_i[e].unsqueeze(0))[0])
        focals.append(focal)
        res = pnp_camera_pose(pts_j_in_i[index[(1 - i, i)]], im_conf[i] > min_conf_thr, focal)
        if res is None:
            log.warning("PnP failed for view %d of the pair; its pose falls back to the identity", i)
            rel_poses.append(torch.eye(4, device=device))
        else:
            rel_poses.append(res[1].to(device))
    eye = torch.eye(4, device=device)
    if confs[0] > confs[1]:  # world = camera 0
        e = index[(0, 1)]
        poses = [eye, rel_poses[1]]
        depths = [pts_i[e][..., 2], transform_points(torch.linalg.inv(rel_poses[1]), pts_j_in_i[e])[..., 2]]
    else:  # world = camera 1
        e = index[(1, 0)]
        poses = [rel_poses[0], eye]
        depths = [transform_points(torch.linalg.inv(rel_poses[0]), pts_j_in_i[e])[..., 2], pts_i[e][..., 2]]
    return torch.stack(poses), torch.tensor(focals, dtype=torch.float32, device=device), torch.stack(depths)
