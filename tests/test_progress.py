"""Every long loop of every stage reports progress the same way: callback(done, total) with done = 1 .. total,
never decreasing, ending at total (the nodes map it onto ComfyUI's progress bar and its cancel button)."""

import torch

from reconx_core.align import align_views
from reconx_core.confidence import map_confidence
from reconx_core.dust3r import infer_pairs
from reconx_core.gaussians import fit_gaussians, render
from reconx_core.structure import PointCloudEncoder
from reconx_core.testing import tiny_dust3r
from reconx_core.video import build_video_model, interpolate_views, tiny_config
from tests.scene_factory import plane_scene


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, done, total):
        self.calls.append((int(done), int(total)))

    def check(self, stage):
        assert self.calls, f"{stage}: no progress reported"
        totals = {t for _, t in self.calls}
        assert len(totals) == 1, f"{stage}: total changed during the loop: {totals}"
        total = totals.pop()
        done = [d for d, _ in self.calls]
        assert done[0] >= 1, f"{stage}: progress starts at {done[0]}, not 1 (0-based?)"
        assert done == sorted(done), f"{stage}: progress goes backwards: {done}"
        assert done[-1] == total, f"{stage}: progress ends at {done[-1]} of {total}"


def test_every_stage_counts_from_one_to_total(one_thread):
    torch.manual_seed(0)
    scene = plane_scene(n_views=2, height=64, width=64)
    dust3r = tiny_dust3r()

    rec = Recorder()
    pairs = infer_pairs(dust3r, scene.images, batch_size=1, callback=rec)
    rec.check("infer_pairs")

    rec = Recorder()
    align_views(pairs, niter=5, two_view_fast_path=False, callback=rec)
    rec.check("align_views")

    rec = Recorder()
    PointCloudEncoder(dim=32, heads=4)(scene.pts3d.reshape(1, -1, 3)[:, :600], callback=rec)
    rec.check("point-cloud encoder (farthest-point sampling)")

    video = build_video_model(tiny_config(), seed=0)
    rec = Recorder()
    views = interpolate_views(video, scene, frames=4, steps=2, callback=rec)
    rec.check("interpolate_views")

    rec = Recorder()
    mapped = map_confidence(dust3r, views, window=1, niter=3, callback=rec)
    rec.check("map_confidence")

    rec = Recorder()
    g = fit_gaussians(mapped.frames, mapped.cameras, conf=mapped.conf, init=scene, steps=3, weights=(1, 0, 0),
                      max_points=500, callback=rec)
    rec.check("fit_gaussians")

    rec = Recorder()
    with torch.no_grad():
        render(g, mapped.cameras[:3], backend="torch", callback=rec)
    rec.check("render")
