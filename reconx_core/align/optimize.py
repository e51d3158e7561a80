"""The global-alignment objective and its Adam loop.

Objective (DUSt3R's PointCloudOptimizer with dist='l1', conf='log'):
    L = 1/(E*H*W) * sum_e sum_{v in (i_e, j_e)} sum_k log(C^{v,e}_k) * | P^v_k - s_e (R_e X^{v,e}_k + T_e) |
where P^v_k are view v's world points (from its log-depth, focal and camera-to-world pose) and X^{v,e} the
edge's prediction of view v in the frame of camera i_e.

Speed: the gradient is written by hand (no autograd graph, no optimiser object). The per-pixel part (E edges x
2 sides x H*W pixels) runs over edge predictions regrouped by the view they predict, channel-first, so each step
is one batched matmul, a few in-place elementwise passes and one batched matmul back, with no per-edge Python
loop. Adam runs on one flat buffer holding every unknown. `reference_objective` is an independent autograd
version used by the tests to check the hand-written gradient.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import roma
import torch

from ..errors import InputError
from .geometry import pixel_grid, signed_expm1
from .init import RawParams


@dataclass
class EdgeData:
    """Per-edge data of the objective, regrouped by view (built once by `prepare_edges`).

    Every edge e = (i, j) holds two "halves": its prediction of view i and of view j, both in camera i's frame.
    Halves are grouped by the view they predict, K slots per view (K = the largest number of halves of one view;
    unused slots are zero-weight padding), channel-first, so that the target world points broadcast with no gather.

    points_h:   (N, K, 4, H*W) float32: x, y, z, 1 of each half's predicted points (camera i_e frame).
    weights:    (N, K, H*W) float32: log-confidences / (E*H*W), the official weights and normalisation.
    half_edge:  (N, K) long: the edge of each slot (0 for padding, whose weight is 0).
    grid:       (2, H*W) float32 pixel coordinates (u, v); pp: (N, 2) principal points.
    """

    points_h: torch.Tensor
    weights: torch.Tensor
    half_edge: torch.Tensor
    grid: torch.Tensor
    pp: torch.Tensor
    n_edges: int
    height: int
    width: int


def prepare_edges(edges: torch.Tensor, pts_i, pts_j_in_i, conf_i, conf_j, n_views: int) -> EdgeData:
    """Stack an edge list's predictions for `objective`. edges (E, 2) long; pts (E, H, W, 3); conf (E, H, W)."""
    E, H, W, _ = pts_i.shape
    hw = H * W
    device = pts_i.device
    slots = [[] for _ in range(n_views)]
    for e, (i, j) in enumerate(edges.tolist()):
        slots[i].append((e, 0))
        slots[j].append((e, 1))
    K = max(len(s) for s in slots)
    points_h = torch.zeros(n_views, K, 4, hw, dtype=torch.float32, device=device)
    weights = torch.zeros(n_views, K, hw, dtype=torch.float32, device=device)
    half_edge = torch.zeros(n_views, K, dtype=torch.long)
    for v, views_slots in enumerate(slots):  # one-off regrouping, not in the optimisation loop
        for k, (e, side) in enumerate(views_slots):
            pts, conf = (pts_i[e], conf_i[e]) if side == 0 else (pts_j_in_i[e], conf_j[e])
            points_h[v, k, :3] = pts.reshape(hw, 3).T
            points_h[v, k, 3] = 1
            weights[v, k] = conf.reshape(hw).log() / (E * hw)
            half_edge[v, k] = e
    pp = torch.tensor((W / 2, H / 2), device=device, dtype=torch.float32).expand(n_views, 2).contiguous()
    return EdgeData(points_h=points_h, weights=weights, half_edge=half_edge.to(device),
                    grid=pixel_grid(H, W, device).reshape(hw, 2).T.contiguous(), pp=pp, n_edges=E,
                    height=H, width=W)


def pw_scales(pw_log_scale: torch.Tensor, base_scale: float = 0.5) -> torch.Tensor:
    """(E,) effective edge scales exp(l_e) * exp(log(base_scale) - mean(l)): their log-mean is pinned."""
    return pw_log_scale.exp() * (math.log(base_scale) - pw_log_scale.mean()).exp()


def edge_affines(params: RawParams, base_scale: float = 0.5) -> torch.Tensor:
    """(E, 3, 4) [s R | s T]: maps an edge's camera-i frame into the world (official `get_pw_poses`)."""
    rot = roma.unitquat_to_rotmat(roma.quat_normalize(params.pw_quat))
    trans = signed_expm1(params.pw_log_trans)
    scale = pw_scales(params.pw_log_scale, base_scale).view(-1, 1, 1)
    return torch.cat((rot, trans.unsqueeze(-1)), dim=-1) * scale


def camera_poses(params: RawParams):
    """Camera-to-world rotations (N, 3, 3) and translations (N, 3)."""
    return roma.unitquat_to_rotmat(roma.quat_normalize(params.im_quat)), signed_expm1(params.im_log_trans)


def focals_of(params: RawParams, focal_break: float = 20.0) -> torch.Tensor:
    """(N,) focals in pixels."""
    return (params.im_focal / focal_break).exp()


def _pair_l1_and_grads(world, affine_h, points_h, weights):
    """sum_{v,k,p} w_vkp | A_vk x_vkp - P_vp | and its gradients w.r.t. P and A, in a handful of fused passes.

    world (N, 3, P) world points; affine_h (N, K, 3, 4) = [s R | s T] of each slot's edge; points_h (N, K, 4, P);
    weights (N, K, P). Returns loss (scalar tensor), grad_world (N, 3, P), grad_affine_h (N, K, 3, 4).
    """
    N, K, _, P = points_h.shape
    flat_pts = points_h.view(N * K, 4, P)
    resid = torch.baddbmm(affine_h[..., 3:].reshape(N * K, 3, 1), affine_h[..., :3].reshape(N * K, 3, 3),
                          flat_pts[:, :3]).view(N, K, 3, P)
    resid.sub_(world.unsqueeze(1))
    dist = resid[:, :, 0].square()
    dist.addcmul_(resid[:, :, 1], resid[:, :, 1]).addcmul_(resid[:, :, 2], resid[:, :, 2]).sqrt_()
    loss = torch.dot(dist.view(-1), weights.view(-1))
    # d|r|/dr = r/|r|; where r == 0 exactly, r * (w/tiny) is still 0, like torch's norm backward.
    grad_resid = resid.mul_(torch.div(weights, dist.clamp_min_(1e-30)).unsqueeze(2))
    grad_world = grad_resid.sum(dim=1).neg_()
    grad_affine = torch.bmm(grad_resid.view(N * K, 3, P), flat_pts.transpose(1, 2)).view(N, K, 3, 4)
    return loss, grad_world, grad_affine


@functools.lru_cache(maxsize=8)
def _quat_forms(device, dtype) -> torch.Tensor:
    """(9, 4, 4) symmetric S_ab with R_ab = q^T S_ab q for a unit XYZW quaternion q (roma's formula).

    Cached: building it takes ~120 tiny tensor ops, 15 % of a small problem's step."""
    forms = torch.zeros(9, 4, 4, dtype=dtype, device=device)
    x, y, z, w = range(4)
    forms[0] = torch.diag(torch.tensor([1., -1, -1, 1]))
    forms[4] = torch.diag(torch.tensor([-1., 1, -1, 1]))
    forms[8] = torch.diag(torch.tensor([-1., -1, 1, 1]))
    for ab, terms in ((1, ((x, y, 1), (z, w, -1))), (2, ((x, z, 1), (y, w, 1))), (3, ((x, y, 1), (z, w, 1))),
                      (5, ((y, z, 1), (x, w, -1))), (6, ((x, z, 1), (y, w, -1))), (7, ((y, z, 1), (x, w, 1)))):
        for m, n, sign in terms:
            forms[ab, m, n] = forms[ab, n, m] = sign
    return forms


def _quats_to_rotmats(quat: torch.Tensor, forms: torch.Tensor):
    """(B, 4) raw quaternions -> unit quaternions (B, 4) and rotations (B, 3, 3), as roma (2 matmuls)."""
    qn = quat / quat.norm(dim=-1, keepdim=True)
    outer = (qn.unsqueeze(-1) * qn.unsqueeze(-2)).reshape(-1, 16)
    return qn, (outer @ forms.reshape(9, 16).T).reshape(-1, 3, 3)


def _rotmat_grad_to_quat(quat: torch.Tensor, qn: torch.Tensor, grad_rot: torch.Tensor,
                         forms: torch.Tensor) -> torch.Tensor:
    """Chain dL/dR (B, 3, 3) back through R = q^T S q, q = quat / |quat|; returns dL/dquat (B, 4)."""
    mix = (grad_rot.reshape(-1, 9) @ forms.reshape(9, 16)).reshape(-1, 4, 4)
    grad_qn = 2 * torch.bmm(mix, qn.unsqueeze(-1)).squeeze(-1)
    # through q / |q|: (I - qn qn^T) / |q|
    return (grad_qn - qn * (qn * grad_qn).sum(-1, keepdim=True)) / quat.norm(dim=-1, keepdim=True)


def _signed_expm1_grad(log_trans: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Chain through sign(x) * expm1(|x|): exp(|x|), and exactly 0 at x == 0 as torch's autograd gives."""
    return grad * torch.exp(log_trans.abs()) * log_trans.sign().square()


def loss_and_grads(params: RawParams, data: EdgeData, base_scale: float = 0.5, focal_break: float = 20.0):
    """The official loss and its exact gradient w.r.t. every tensor of `params`, without autograd.

    Returns (loss: scalar tensor, grads: list of tensors shaped like `params.tensors()`).
    """
    E = params.pw_quat.shape[0]
    forms = _quat_forms(data.grid.device, data.grid.dtype)
    # edges' and cameras' rotations and translations in one batch each (fewer tiny ops per step)
    quats = torch.cat((params.pw_quat, params.im_quat))
    log_trans = torch.cat((params.pw_log_trans, params.im_log_trans))
    qn, rots = _quats_to_rotmats(quats, forms)
    transs = signed_expm1(log_trans)
    scale = pw_scales(params.pw_log_scale, base_scale)
    rigid = torch.cat((rots[:E], transs[:E].unsqueeze(-1)), dim=-1)  # (E, 3, 4)
    affine = rigid * scale.view(-1, 1, 1)
    rot, trans = rots[E:], transs[E:]
    focal = focals_of(params, focal_break)
    depth = params.im_log_depth.exp().unsqueeze(1)  # (N, 1, P)
    cam = torch.cat((depth * (data.grid.unsqueeze(0) - data.pp.unsqueeze(-1)) / focal.view(-1, 1, 1), depth), dim=1)
    world = torch.baddbmm(trans.unsqueeze(-1), rot, cam)

    loss, grad_world, grad_affine_h = _pair_l1_and_grads(world, affine[data.half_edge], data.points_h, data.weights)

    # back through the edges' similarities
    grad_affine = torch.zeros_like(affine).index_add_(0, data.half_edge.view(-1), grad_affine_h.view(-1, 3, 4))
    grad_scale = (grad_affine * rigid).sum(dim=(1, 2)) * scale
    grad_rigid = grad_affine * scale.view(-1, 1, 1)
    # back through the views' poses, focals and log-depths
    grad_rots = torch.cat((grad_rigid[..., :3], torch.bmm(grad_world, cam.transpose(1, 2))))
    grad_transs = torch.cat((grad_rigid[..., 3], grad_world.sum(dim=-1)))
    grad_quats = _rotmat_grad_to_quat(quats, qn, grad_rots, forms)
    grad_log_trans = _signed_expm1_grad(log_trans, grad_transs)
    grad_cam_times_cam = torch.bmm(rot.transpose(1, 2), grad_world).mul_(cam)  # d cam_c / d log(depth) = cam_c
    grads = [grad_quats[:E], grad_log_trans[:E],
             grad_scale - grad_scale.mean(),  # the log-mean of the scales is pinned
             grad_quats[E:], grad_log_trans[E:],
             grad_cam_times_cam.sum(dim=1),
             -grad_cam_times_cam[:, :2].sum(dim=(1, 2)) / focal_break]
    return loss, grads


def objective(params: RawParams, data: EdgeData, base_scale: float = 0.5, focal_break: float = 20.0):
    """The official loss as a scalar tensor (no gradient)."""
    with torch.no_grad():
        return loss_and_grads(params, data, base_scale, focal_break)[0]


def reference_objective(params: RawParams, data: EdgeData, base_scale: float = 0.5, focal_break: float = 20.0):
    """The same loss in plain autograd, written independently of `loss_and_grads` (slow; for tests)."""
    rot, trans = camera_poses(params)
    depth = params.im_log_depth.exp().unsqueeze(-1)  # (N, P, 1)
    uv = data.grid.T.unsqueeze(0)  # (1, P, 2)
    focal = focals_of(params, focal_break).view(-1, 1, 1)
    cam = torch.cat((depth * (uv - data.pp.unsqueeze(1)) / focal, depth), dim=-1)  # (N, P, 3)
    world = cam @ rot.transpose(1, 2) + trans.unsqueeze(1)
    affine = edge_affines(params, base_scale)[data.half_edge]  # (N, K, 3, 4)
    pts = data.points_h[:, :, :3].transpose(2, 3)  # (N, K, P, 3)
    aligned = pts @ affine[..., :3].transpose(2, 3) + affine[..., 3].unsqueeze(2)
    return ((aligned - world.unsqueeze(1)).norm(dim=-1) * data.weights).sum()


def learning_rate(step: int, niter: int, lr: float, schedule: str, lr_min: float = 1e-6) -> float:
    """Learning rate of iteration `step` of `niter` (official cosine_schedule / linear_schedule)."""
    t = step / niter
    if schedule == "cosine":
        return float(lr_min + (lr - lr_min) * (1 + np.cos(t * np.pi)) / 2)
    if schedule == "linear":
        return float(lr + (lr_min - lr) * t)
    raise InputError(f"unknown schedule {schedule!r}; use 'cosine' or 'linear'")


def run_adam(params: RawParams, data: EdgeData, *, niter: int = 300, lr: float = 0.01, schedule: str = "cosine",
             lr_min: float = 1e-6, base_scale: float = 0.5, focal_break: float = 20.0,
             callback: Optional[Callable[[int, int], None]] = None):
    """Optimise with Adam (betas (0.9, 0.9), eps 1e-8), step for step as the official `global_alignment_loop`.

    The update is torch.optim.Adam's, written out on one flat buffer of every unknown. `callback(step, niter)`
    runs after every step; an exception it raises (e.g. a user interrupt) stops the loop there.
    Returns (the optimised RawParams, views into one flat buffer; {"loss_curve": (niter,) float32 on the data's device,
    the loss before each step as officially recorded; "seconds": wall time of the loop}).
    """
    learning_rate(0, max(niter, 1), lr, schedule, lr_min)  # validates `schedule` before any work
    start = time.perf_counter()
    tensors = [t.detach() for t in params.tensors()]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    params = RawParams(*views)
    grad = torch.empty_like(flat)
    grad_views = [grad[o - t.numel():o].view(t.shape) for t, o in
                  zip(tensors, np.cumsum([t.numel() for t in tensors]).tolist())]
    exp_avg, exp_avg_sq = torch.zeros_like(flat), torch.zeros_like(flat)
    beta1, beta2, eps = 0.9, 0.9, 1e-8
    curve = torch.empty(niter, dtype=torch.float32, device=flat.device)
    for step in range(niter):
        loss, grads = loss_and_grads(params, data, base_scale, focal_break)
        for g_view, g in zip(grad_views, grads):
            g_view.copy_(g)
        curve[step] = loss
        t = step + 1
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = learning_rate(step, niter, lr, schedule, lr_min) / (1 - beta1 ** t)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        flat.addcdiv_(exp_avg, denom, value=-step_size)
        if callback is not None:
            callback(step + 1, niter)
    return params, {"loss_curve": curve, "seconds": time.perf_counter() - start}
