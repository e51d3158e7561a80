"""crop_resize keeps the projection geometry: a 3D point lands on the same image content after it."""

import torch

from reconx_core.framing import crop_box, crop_resize
from reconx_core.types import Cameras


def project(K, X):
    uv = (K @ X.T).T
    return uv[:, :2] / uv[:, 2:]


def test_crop_box_keeps_the_target_aspect():
    assert crop_box(512, 384, 512, 320) == (0, 32, 512, 320)
    assert crop_box(300, 400, 512, 320) == (0, 106, 300, 188)
    assert crop_box(64, 64, 64, 64) == (0, 0, 64, 64)


def test_projection_follows_the_crop_and_resize():
    H, W = 48, 80
    K = torch.tensor([[[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]]])
    cams = Cameras(torch.eye(4)[None], K, W, H)
    # an image whose value at each pixel is its own (u, v): after the crop/resize, sampling the new image at the
    # projection of a point must give back (up to interpolation) the old pixel coordinates of that point.
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    image = torch.stack([u / W, v / H, torch.zeros_like(u)])[None]
    out, cams2 = crop_resize(image, cams, 32, 32)
    X = torch.tensor([[0.1, -0.05, 1.0], [-0.15, 0.1, 1.3], [0.0, 0.0, 2.0]])
    old = project(K[0], X)
    new = project(cams2.intrinsics[0], X)
    for (uo, vo), (un, vn) in zip(old, new):
        # bilinear sample of the new image at (un, vn) (pixel centres at integers)
        grid = torch.tensor([[[[(un + 0.5) / 32 * 2 - 1, (vn + 0.5) / 32 * 2 - 1]]]])
        sample = torch.nn.functional.grid_sample(out, grid, align_corners=False)[0, :, 0, 0]
        assert abs(float(sample[0]) * W - float(uo)) < 0.6
        assert abs(float(sample[1]) * H - float(vo)) < 0.6
