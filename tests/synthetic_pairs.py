"""The synthetic scene of the dust3r_globalalign fixture (README A3) at any N, H, W, as DUSt3R-like pair predictions.

Geometry: a floor at y=1, a back wall at z=3, side walls at x=+-2.5, spheres of radius 0.8 at (0, 0.2, 0.5) and
0.5 at (-1.2, 0.5, 1.5). N cameras on an arc of radius 3.2 around (0, ., 0.5), from -30 to +30 degrees, looking at
(0, 0.3, 0.8); focal 1.1 * W / (2 tan 30 deg); principal point (W/2, H/2). Depth by ray casting in float64.
Pairs: every ordered pair in make_pairs('complete', symmetrize=True) order, each scaled by a random factor in
[0.5, 2], every coordinate times (1 + 0.005 N(0, 1)); confidences 1 + exp(N(1.5, 0.5)) and 1 + exp(N(1.2, 0.5)).
Also: `errors_vs_gt`, the fixture JSON's error metrics for any aligned Scene.
"""

from __future__ import annotations

import math

import numpy as np
import roma
import torch

from reconx_core.types import PairPredictions

SPHERES = (((0.0, 0.2, 0.5), 0.8), ((-1.2, 0.5, 1.5), 0.5))


def scene_focal(width: int) -> float:
    return 1.1 * width / (2 * math.tan(math.radians(30)))


def arc_cameras(n_views: int) -> torch.Tensor:
    """(N, 4, 4) float64 camera-to-world poses on the fixture's arc (heights alternate as in the fixture)."""
    target = np.array((0.0, 0.3, 0.8))
    poses = []
    for k, angle in enumerate(np.radians(np.linspace(-30, 30, n_views))):
        centre = np.array((3.2 * math.sin(angle), -0.45 - 0.3 * (k % 2), 0.5 - 3.2 * math.cos(angle)))
        z = target - centre
        z /= np.linalg.norm(z)
        x = np.cross(z, (0.0, 1.0, 0.0))
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        pose = np.eye(4)
        pose[:3, :3] = np.stack((x, y, z), axis=1)
        pose[:3, 3] = centre
        poses.append(pose)
    return torch.from_numpy(np.stack(poses))


def render_depth(cam_to_world: torch.Tensor, focal: float, height: int, width: int) -> torch.Tensor:
    """(N, H, W) float64 z-depth of the synthetic scene by ray casting from each camera."""
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    rays_cam = torch.stack(((u - width / 2) / focal, (v - height / 2) / focal, torch.ones_like(u)), dim=-1)
    depths = []
    for pose in cam_to_world.double():
        dirs = rays_cam @ pose[:3, :3].T  # ray parameter t is the z-depth since rays_cam has z = 1
        origin = pose[:3, 3]
        best = torch.full((height, width), math.inf, dtype=torch.float64)
        for axis, value in ((1, 1.0), (2, 3.0), (0, 2.5), (0, -2.5)):
            t = (value - origin[axis]) / dirs[..., axis]
            best = torch.where((t > 1e-9) & (t < best), t, best)
        for centre, radius in SPHERES:
            oc = origin - torch.tensor(centre, dtype=torch.float64)
            a = dirs.square().sum(-1)
            b = 2 * (dirs @ oc)
            c = float(oc @ oc) - radius ** 2
            disc = b * b - 4 * a * c
            t = (-b - disc.clamp(min=0).sqrt()) / (2 * a)
            best = torch.where((disc >= 0) & (t > 1e-9) & (t < best), t, best)
        depths.append(best)
    return torch.stack(depths)


def make_synthetic_pairs(n_views: int = 4, height: int = 32, width: int = 48, seed: int = 0,
                         noise: float = 0.005):
    """Pair predictions of the synthetic scene plus its ground truth.

    Returns (PairPredictions with float32 tensors and no images, gt dict: cam_to_world (N, 4, 4), focal (N,),
    depth (N, H, W), pair_scale (E,), all float32).
    """
    cam_to_world = arc_cameras(n_views)
    focal = scene_focal(width)
    depth = render_depth(cam_to_world, focal, height, width)
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    cam_pts = torch.stack(((u - width / 2) * depth / focal, (v - height / 2) * depth / focal, depth), dim=-1)
    world = cam_pts @ cam_to_world[:, None, :3, :3].transpose(-1, -2) + cam_to_world[:, None, None, :3, 3]
    edges = [(i, j) for i in range(n_views) for j in range(i)]
    edges += [(j, i) for i, j in edges]
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.5, 2.0, len(edges))
    pts_i, pts_j = [], []
    for (i, j), s in zip(edges, scales):
        world_to_i = torch.linalg.inv(cam_to_world[i])
        j_in_i = world[j] @ world_to_i[:3, :3].T + world_to_i[:3, 3]
        for out, pts in ((pts_i, cam_pts[i]), (pts_j, j_in_i)):
            out.append(pts * s * (1 + noise * torch.from_numpy(rng.standard_normal(pts.shape))))
    rng_conf = np.random.default_rng(seed + 1)
    shape = (len(edges), height, width)
    conf_i = 1 + np.exp(rng_conf.normal(1.5, 0.5, shape))
    conf_j = 1 + np.exp(rng_conf.normal(1.2, 0.5, shape))
    pairs = PairPredictions(torch.tensor(edges), torch.stack(pts_i).float(), torch.stack(pts_j).float(),
                            torch.from_numpy(conf_i).float(), torch.from_numpy(conf_j).float())
    gt = {"cam_to_world": cam_to_world.float(), "focal": torch.full((n_views,), focal, dtype=torch.float32),
          "depth": depth.float(), "pair_scale": torch.from_numpy(scales).float()}
    return pairs, gt


def _angle_deg(rot: torch.Tensor) -> torch.Tensor:
    """Rotation angle in degrees, accurate near 0 (unlike arccos of the trace)."""
    return torch.rad2deg(roma.rotmat_to_rotvec(rot).norm(dim=-1))


def errors_vs_gt(cam_to_world, focals, depths, pts3d, gt_cam_to_world, gt_focal, gt_depth) -> dict:
    """The fixture JSON's `errors_vs_gt` metrics, after an unweighted Sim(3) fit of all predicted 3D points onto
    the ground-truth ones (roma.rigid_points_registration with scaling). All inputs torch tensors (any float)."""
    dd = torch.float64
    c2w, gt_c2w = cam_to_world.to(dd), gt_cam_to_world.to(dd)
    gt_cam = torch.stack(torch.meshgrid(torch.arange(gt_depth.shape[1], dtype=dd),
                                        torch.arange(gt_depth.shape[2], dtype=dd), indexing="ij")[::-1], dim=-1)
    f = gt_focal.to(dd).view(-1, 1, 1, 1)
    centre = torch.tensor((gt_depth.shape[2] / 2, gt_depth.shape[1] / 2), dtype=dd)
    d = gt_depth.to(dd).unsqueeze(-1)
    gt_cam_pts = torch.cat(((gt_cam - centre) * d / f, d), dim=-1)
    gt_pts = gt_cam_pts @ gt_c2w[:, None, :3, :3].transpose(-1, -2) + gt_c2w[:, None, None, :3, 3]
    pred = pts3d.to(dd).reshape(-1, 3)
    rot, trans, scale = roma.rigid_points_registration(pred, gt_pts.reshape(-1, 3), compute_scaling=True)
    point_err = (scale * pred @ rot.T + trans - gt_pts.reshape(-1, 3)).norm(dim=-1)
    centres = scale * c2w[:, :3, 3] @ rot.T + trans
    centre_err = (centres - gt_c2w[:, :3, 3]).norm(dim=-1)
    rot_err = _angle_deg(gt_c2w[:, :3, :3].transpose(1, 2) @ rot @ c2w[:, :3, :3])
    n = c2w.shape[0]
    rel = [float(_angle_deg((c2w[i, :3, :3].T @ c2w[j, :3, :3]).T @ (gt_c2w[i, :3, :3].T @ gt_c2w[j, :3, :3])))
           for i in range(n) for j in range(i + 1, n)]
    return {
        "point_err_mean": float(point_err.mean()),
        "cam_center_rmse": float(centre_err.square().mean().sqrt()),
        "cam_rot_err_deg": rot_err.tolist(),
        "rel_rot_err_deg_pairs_i_lt_j": rel,
        "focal_rel_err": ((focals.to(dd) - gt_focal.to(dd)).abs() / gt_focal.to(dd)).tolist(),
        "depth_abs_rel_after_scale": float(((scale * depths.to(dd) - gt_depth.to(dd)).abs() / gt_depth.to(dd)).mean()),
    }


def ratios_to_official(fixture, fixture_json, rot, trans, focals, depth) -> dict:
    """Errors against the ground truth of the dust3r_globalalign fixture over the official run's recorded ones.

    fixture / fixture_json: its tensors and JSON; rot (N, 3, 3), trans (N, 3) camera-to-world; focals (N,);
    depth (N, H, W). Lists (per view or per pair) compare by their worst entry. Returns {metric: ratio}.
    """
    n, height, width = depth.shape
    c2w = torch.eye(4).repeat(n, 1, 1)
    c2w[:, :3, :3], c2w[:, :3, 3] = rot, trans
    v, u = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    f = focals.view(n, 1, 1)
    cam = torch.stack(((u - width / 2) * depth / f, (v - height / 2) * depth / f, depth), dim=-1)
    pts = cam @ rot[:, None].transpose(-1, -2) + trans[:, None, None]
    ours = errors_vs_gt(c2w, focals, depth, pts, fixture["gt_cam2world"], fixture["gt_focal"], fixture["gt_depth"])
    worst = lambda value: max(value) if isinstance(value, list) else value  # noqa: E731
    return {key: worst(ours[key]) / worst(ref) for key, ref in fixture_json["errors_vs_gt"].items() if key in ours}
