"""The node boundary without ComfyUI: layout conversions, output-folder safety, progress/interrupt, PLY export."""

import pytest
import torch

from nodes import comfy_bridge as bridge
from nodes.convert import confidence_to_mask, image_to_comfy, image_to_core
from reconx_core.errors import InputError
from reconx_core.export import point_cloud_ply_bytes, read_point_cloud_ply
from reconx_core.preview import colorize, depth_preview


def test_image_round_trip_and_channels():
    image = torch.rand(2, 5, 7, 3)
    core = image_to_core(image)
    assert core.shape == (2, 3, 5, 7)
    assert torch.equal(image_to_comfy(core), image)
    rgba = torch.rand(1, 4, 4, 4)
    assert torch.equal(image_to_core(rgba), rgba[..., :3].permute(0, 3, 1, 2))
    grey = torch.rand(1, 4, 4, 1)
    assert image_to_core(grey).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(5, 7, 3), "IMAGE batch"),
    (torch.rand(1, 5, 7, 2), "2 channels"),
    (torch.full((1, 5, 7, 3), float("nan")), "NaN"),
])
def test_image_errors_name_the_problem(bad, message):
    with pytest.raises(InputError, match=message):
        image_to_core(bad)


def test_confidence_mask_is_monotone_in_unit_interval():
    conf = torch.tensor([[[1.0, 2.0, 10.0, 1e6]]])
    mask = confidence_to_mask(conf)
    assert mask.min() >= 0 and mask.max() < 1
    assert torch.all(mask[..., 1:] > mask[..., :-1])
    assert mask[0, 0, 0] == 0


def test_progress_callback_raises_on_interrupt():
    progress = bridge.Progress(10)
    step = progress.phase(10)
    step(0, 10)
    bridge.request_interrupt()
    try:
        with pytest.raises(bridge.Interrupted):
            step(1, 10)
    finally:
        bridge.request_interrupt(False)


def test_model_path_errors_name_the_folder(tmp_path, monkeypatch):
    from reconx_core.errors import CheckpointError

    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", tmp_path)
    (tmp_path / "dust3r").mkdir()
    (tmp_path / "dust3r" / "a.safetensors").write_bytes(b"x")
    assert bridge.list_models("dust3r") == ["a.safetensors"]
    assert bridge.model_path("dust3r", "a.safetensors") == (tmp_path / "dust3r" / "a.safetensors").resolve()
    with pytest.raises(CheckpointError, match="models/dust3r"):
        bridge.model_path("dust3r", "missing.pth")
    with pytest.raises(CheckpointError):
        bridge.model_path("dust3r", "../dust3r/../../etc/passwd")


def test_point_cloud_ply_round_trip():
    points = torch.randn(50, 3)
    colours = torch.rand(50, 3)
    back_points, back_colours = read_point_cloud_ply(point_cloud_ply_bytes(points, colours))
    assert torch.equal(back_points, points)
    assert (back_colours - colours).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(InputError, match="empty"):
        point_cloud_ply_bytes(torch.zeros(0, 3), torch.zeros(0, 3))


def test_file3d_fallback_carries_bytes():
    f = bridge.make_file3d(b"ply\n", "ply")
    assert f.format == "ply" and bridge.file3d_bytes(f) == b"ply\n"


def test_depth_preview_orders_near_and_far():
    depth = torch.tensor([[[1.0, 2.0, 4.0, 8.0]]])
    rgb = depth_preview(depth)
    assert rgb.shape == (1, 1, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # near pixels map to the warm (red) end, far ones to the cool (blue) end
    assert rgb[0, 0, 0, 0] > rgb[0, 0, 0, 2] and rgb[0, 0, -1, 2] > rgb[0, 0, -1, 0]
    valid = torch.tensor([[[True, True, False, True]]])
    assert torch.all(colorize(depth, valid)[0, 0, 2] == 0)


def test_camera_indexing_handles_negative_indices():
    from reconx_core.types import Cameras

    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[:, 0, 3] = torch.tensor([0.0, 1.0, 2.0])
    cams = Cameras(c2w, torch.eye(3).repeat(3, 1, 1), 8, 6)
    assert len(cams[-1]) == 1 and float(cams[-1].cam_to_world[0, 0, 3]) == 2.0
    with pytest.raises(IndexError):
        cams[3]
