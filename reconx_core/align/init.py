"""Minimum-spanning-tree initialisation of the global alignment (DUSt3R's `init='mst'`).

1. Score every directed edge by mean(conf_i) * mean(conf_j); keep a maximum-score spanning tree (Kruskal).
2. Walk the tree from its strongest edge, chaining weighted Procrustes (with scale) to bring every view's point
   map into the first view's frame; a view reached through its own point map gets its pose from that Procrustes.
3. Focals by Weiszfeld; the remaining poses by PnP against the chained point maps.
4. One similarity per edge (Procrustes of its view-i map onto the chained map), scale normalisation, and
   depth maps read off the chained point maps.
The order of operations, including which point map each focal is estimated from, follows the official code
so that the initial state, and so the whole optimisation, matches it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import roma
import torch

from ..errors import InputError
from ..geometry import similarity_matrix, transform_points
from .geometry import estimate_focal_weiszfeld, signed_log1p, weighted_procrustes
from .pnp import pnp_camera_pose

log = logging.getLogger(__name__)


@dataclass
class RawParams:
    """The optimiser's unknowns in DUSt3R's parameterisation (all float32, one device).

    pw_quat (E, 4) XYZW, pw_log_trans (E, 3) signed_log1p(T / s), pw_log_scale (E,): one similarity per edge,
    mapping the edge's camera-i frame to the world; its effective scale is normalised (see `optimize.pw_scales`).
    im_quat (N, 4), im_log_trans (N, 3): camera-to-world poses. im_log_depth (N, H*W): log z-depth.
    im_focal (N,): focal_break * log(focal in pixels).
    """

    pw_quat: torch.Tensor
    pw_log_trans: torch.Tensor
    pw_log_scale: torch.Tensor
    im_quat: torch.Tensor
    im_log_trans: torch.Tensor
    im_log_depth: torch.Tensor
    im_focal: torch.Tensor

    def tensors(self) -> list:
        return [self.pw_quat, self.pw_log_trans, self.pw_log_scale, self.im_quat, self.im_log_trans,
                self.im_log_depth, self.im_focal]


def edge_scores(conf_i: torch.Tensor, conf_j: torch.Tensor) -> list:
    """Per-edge score mean(conf_i) * mean(conf_j) as Python floats; conf_*: (E, H, W)."""
    return (conf_i.mean(dim=(1, 2)) * conf_j.mean(dim=(1, 2))).tolist()


def max_spanning_tree(edges: list, scores: list, n_views: int) -> list:
    """Kruskal on the directed edges by decreasing score; returns the kept (score, i, j).

    Ties break by (i, j) ascending, like scipy's minimum_spanning_tree on the negated CSR matrix that the
    official code builds. Raises InputError if the edges do not connect all views.
    """
    parent = list(range(n_views))

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    kept = []
    for score, i, j in sorted(((s, i, j) for (i, j), s in zip(edges, scores)), key=lambda x: (-x[0], x[1], x[2])):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[ri] = rj
            kept.append((score, i, j))
    if len(kept) != n_views - 1:
        groups = {}
        for v in range(n_views):
            groups.setdefault(root(v), []).append(v)
        raise InputError(f"the pair graph does not connect all {n_views} views (groups: {list(groups.values())}); "
                         "use a scene graph that links every view, e.g. 'complete' or a swin graph")
    return kept


def _focal_of(pts_cam: torch.Tensor) -> float:
    return float(estimate_focal_weiszfeld(pts_cam.unsqueeze(0))[0])


@torch.no_grad()
def chain_spanning_tree(edges, pts_i, pts_j_in_i, conf_i, conf_j, im_conf, min_conf_thr):
    """Chain the tree's pairwise point maps into one frame (official `minimum_spanning_tree`).

    edges: list of (i, j); pts_*: (E, H, W, 3); conf_*: (E, H, W); im_conf: (N, H, W).
    Returns pts3d (N, H, W, 3) in the frame of the strongest edge's view i, focals (N,) list of floats,
    cam_to_world (N, 4, 4) float32, and the tree as a list of (i, j). Views the tree reaches only through their
    second-view map are posed by our deterministic PnP (pnp.py) on the pixels above `min_conf_thr`.
    """
    n_views = im_conf.shape[0]
    device = pts_i.device
    edges = [(int(i), int(j)) for i, j in edges]
    edge_index = {e: k for k, e in enumerate(edges)}
    scores = edge_scores(conf_i, conf_j)
    tree = max_spanning_tree(edges, scores, n_views)
    todo = sorted(tree)  # ascending; pop() takes the strongest
    pts3d = [None] * n_views
    poses = [None] * n_views
    focals = [None] * n_views

    _, i, j = todo.pop()
    e = edge_index[(i, j)]
    pts3d[i], pts3d[j] = pts_i[e].clone(), pts_j_in_i[e].clone()
    done = {i, j}
    poses[i] = torch.eye(4, device=device)
    focals[i] = _focal_of(pts_i[e])
    tree_edges = [(i, j)]
    while todo:
        score, i, j = todo.pop()
        # The official code estimates a missing focal here from the *previous* edge's view-i map (its loop
        # variable is only refreshed below); we keep that so the init matches it bit for bit.
        if focals[i] is None:
            focals[i] = _focal_of(pts_i[e])
        if i in done or j in done:
            e = edge_index[(i, j)]
            if i in done:
                s, rot, trans = weighted_procrustes(pts_i[e].reshape(-1, 3), pts3d[i].reshape(-1, 3),
                                                    conf_i[e].reshape(-1))
                pts3d[j] = transform_points(similarity_matrix(s, rot, trans), pts_j_in_i[e])
                done.add(j)
            else:
                s, rot, trans = weighted_procrustes(pts_j_in_i[e].reshape(-1, 3), pts3d[j].reshape(-1, 3),
                                                    conf_j[e].reshape(-1))
                pts3d[i] = transform_points(similarity_matrix(s, rot, trans), pts_i[e])
                done.add(i)
            tree_edges.append((i, j))
            if poses[i] is None:
                poses[i] = similarity_matrix(1.0, rot, trans)
        else:
            todo.insert(0, (score, i, j))  # neither end placed yet: retry later

    order = np.argsort(-np.asarray(scores), kind="stable")
    for k in order.tolist():
        i = edges[k][0]
        if focals[i] is None:
            focals[i] = _focal_of(pts_i[k])
    for v in range(n_views):
        if poses[v] is None:
            res = pnp_camera_pose(pts3d[v], im_conf[v] > min_conf_thr, focals[v])
            if res is not None:
                focals[v], poses[v] = res[0], res[1].to(device)
            else:
                log.warning("PnP failed for view %d; its pose starts at the identity", v)
                poses[v] = torch.eye(4, device=device)
        if focals[v] is None:
            raise InputError(f"view {v} is never the first view of an edge, so its focal cannot be estimated; "
                             "use a symmetrised pair graph")
    return torch.stack(pts3d), focals, torch.stack(poses).float(), tree_edges


@torch.no_grad()
def init_mst(edges, pts_i, pts_j_in_i, conf_i, conf_j, im_conf, min_conf_thr, *, base_scale=0.5,
             focal_break=20.0) -> RawParams:
    """Initial raw parameters from the maximum spanning tree (official `init_minimum_spanning_tree`).

    Inputs as `chain_spanning_tree`. Each edge's similarity is a weighted Procrustes (weights conf_i) of the
    edge's view-i map onto the chained map of view i, one edge per call (see below).
    """
    E, H, W, _ = pts_i.shape
    edges = [(int(i), int(j)) for i, j in edges]
    pts3d, focals, poses, _ = chain_spanning_tree(edges, pts_i, pts_j_in_i, conf_i, conf_j, im_conf, min_conf_thr)
    # One registration per edge, not one batched call: per edge the result equals the official init bit for bit
    # (a batched float32 call sums in another order). It matters more than its size suggests: on the alignment
    # fixture, 1e-6 changes of the edge scales (batched, or even float64) move the worst relative-rotation error
    # after 300 steps by tens of percent (a chaotic statistic). This runs once, outside the optimisation loop.
    fits = [weighted_procrustes(pts_i[e].reshape(-1, 3), pts3d[i].reshape(-1, 3), conf_i[e].reshape(-1))
            for e, (i, _) in enumerate(edges)]
    scale, rot, trans = (torch.stack(parts) for parts in zip(*fits))
    pw_log_scale = scale.log()
    pw_quat = roma.rotmat_to_unitquat(rot)
    pw_log_trans = signed_log1p(trans / scale.unsqueeze(-1))

    # Rescale the world so that the normalised edge scales average base_scale (in log), as officially.
    s_factor = (np.log(base_scale) - pw_log_scale.mean()).exp()
    poses = poses.clone()
    poses[:, :3, 3] *= s_factor
    pts3d = pts3d * s_factor
    world_to_cam = torch.linalg.inv(poses)
    depth = transform_points(world_to_cam, pts3d)[..., 2]
    return RawParams(
        pw_quat=pw_quat.float(), pw_log_trans=pw_log_trans.float(), pw_log_scale=pw_log_scale.float(),
        im_quat=roma.rotmat_to_unitquat(poses[:, :3, :3]).float(), im_log_trans=signed_log1p(poses[:, :3, 3]).float(),
        im_log_depth=depth.reshape(-1, H * W).log().nan_to_num(neginf=0).float(),
        im_focal=(focal_break * torch.tensor(focals, dtype=torch.float64).log()).float().to(pts_i.device))
