"""The structure nodes without a video model: renders along a path, frames from any video node as RECONX_VIEWS,
and the deviation of recovered cameras from the intended path that confidence mapping reports."""

import math

import pytest
import torch

from nodes.structure_nodes import ReconXFramesToViews, ReconXRenderPointCloud, parse_reference_frames
from reconx_core.camera_path import segment_path
from reconx_core.confidence import intended_deviation
from reconx_core.errors import InputError
from reconx_core.geometry import axis_angle_to_rotmat
from reconx_core.types import Views
from tests.scene_factory import plane_scene


def test_render_node_without_a_video_model():
    scene = plane_scene(3, 48, 64)
    images, coverage, renders = ReconXRenderPointCloud().render(scene, "auto", 0, 0, 0, 0.0, 0)
    # no model: 16 frames per segment, the scene's size, a linear path
    assert images.shape == (31, 48, 64, 3) and coverage.shape == (31, 48, 64)
    assert renders.path == "linear" and renders.frames_per_segment == 16
    assert renders.reference_index.tolist() == [0, 15, 30]
    assert 0 <= float(images.min()) and float(images.max()) <= 1 and float(coverage.mean()) > 0.5
    _, _, spline = ReconXRenderPointCloud().render(scene, "spline", 5, 32, 24, 1.5, 1000)
    assert spline.size == (24, 32) and spline.radius == 1.5 and spline.info["points"] == 1000
    with pytest.raises(InputError, match="ReconX Render Point Cloud: .*at least 2"):
        ReconXRenderPointCloud().render(plane_scene(1), "auto", 0, 0, 0, 0.0, 0)


def test_reference_frames():
    assert parse_reference_frames("auto", 81, 2) == [0, 80]
    assert parse_reference_frames(" AUTO ", 49, 3) == [0, 24, 48]
    assert parse_reference_frames("0, 30; -1", 49, 3) == [0, 30, 48]
    with pytest.raises(InputError, match="evenly spaced.*'0, 40, 80'"):
        parse_reference_frames("auto", 50, 3)
    with pytest.raises(InputError, match="3 reference frames given for the scene's 2 photos"):
        parse_reference_frames("0, 5, 9", 10, 2)
    with pytest.raises(InputError, match="must increase"):
        parse_reference_frames("5, 2", 10, 2)
    with pytest.raises(InputError, match="frame numbers separated by commas"):
        parse_reference_frames("first, last", 10, 2)


def test_frames_from_another_video_model():
    scene = plane_scene(3, 48, 64)
    video = torch.rand(9, 40, 40, 3, generator=torch.Generator().manual_seed(0))   # ComfyUI IMAGE, another size
    (views,) = ReconXFramesToViews().convert(video, scene, "auto", "spline")
    assert isinstance(views, Views) and len(views) == 9 and views.reference_index.tolist() == [0, 4, 8]
    assert (views.reference_cameras.width, views.reference_cameras.height) == (40, 40)   # cropped to the video's aspect
    expect = segment_path(views.reference_cameras, 5, "spline")
    torch.testing.assert_close(views.intended_cameras.cam_to_world, expect.cam_to_world)
    assert views.info["frames_per_segment"] == 5 and views.reference_depths.shape == (3,)
    torch.testing.assert_close(views.frames, video.permute(0, 3, 1, 2))
    # photos not evenly spaced: the motion in between is unknown, so no intended cameras
    (uneven,) = ReconXFramesToViews().convert(video, scene, "0, 3, 8", "linear")
    assert uneven.intended_cameras is None and uneven.reference_index.tolist() == [0, 3, 8]


def test_intended_deviation_measures_rotation_and_centre_distance():
    intended = segment_path(plane_scene(2).cameras, 5, "linear").cam_to_world     # baseline 0.4 along x
    assert intended_deviation(intended, intended, intended[[0, 4]])["intended_rot_deg"].abs().max() < 1e-3
    moved = intended.clone()
    moved[2, :3, :3] = moved[2, :3, :3] @ axis_angle_to_rotmat(torch.tensor([0.0, math.radians(10), 0.0]))
    moved[2, :3, 3] += torch.tensor([0.0, 0.1, 0.0])
    dev = intended_deviation(moved, intended, intended[[0, 4]])
    assert dev["intended_rot_deg"][2] == pytest.approx(10.0, abs=1e-3)
    assert dev["intended_centre_err"][2] == pytest.approx(0.25, abs=1e-5)        # 0.1 / 0.4
    assert float(dev["intended_rot_deg"][[0, 1, 3, 4]].abs().max()) < 1e-3


def test_confidence_mapping_reports_the_deviation(one_thread):
    """Confidence mapping on frames with intended cameras keeps the per-frame deviation in its info."""
    from reconx_core.confidence import map_confidence
    from reconx_core.testing import tiny_dust3r

    scene = plane_scene(2, 48, 64)
    video = scene.images[[0, 0, 1, 1, 1]].permute(0, 2, 3, 1)
    (views,) = ReconXFramesToViews().convert(video, scene, "auto", "linear")
    mapped = map_confidence(tiny_dust3r(), views, window=2, niter=5, min_conf_thr=1.0)
    info = mapped.info["confidence"]
    assert info["intended_rot_deg"].shape == (5,) and info["intended_centre_err"].shape == (5,)
    assert bool(torch.isfinite(info["intended_rot_deg"]).all())
