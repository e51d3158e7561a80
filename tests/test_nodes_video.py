"""Stage 2-3 nodes called directly, with tiny random-weight models written to a temporary models folder."""

import pytest
import torch

from nodes import comfy_bridge as bridge
from nodes.loader_nodes import ReconXVideoModelLoader
from nodes.video_nodes import ReconXEncodePointCloud, ReconXInterpolate
from reconx_core.errors import InputError, ResourceError
from reconx_core.testing import TINY_BRANCH, TINY_VIDEO
from reconx_core.types import Views
from tests.scene_factory import plane_scene


def test_loader_lists_files_and_interpolates_without_structure(use_models):
    choices = ReconXVideoModelLoader.INPUT_TYPES()["required"]
    assert TINY_VIDEO in choices["ckpt_name"][0] and "none" in choices["structure_name"][0]
    (model,) = ReconXVideoModelLoader().load(TINY_VIDEO, "none", "fp32", "cpu", True)
    scene = plane_scene(3, 48, 64)
    frames, views = ReconXInterpolate().interpolate(model, scene, "", 2, 7.5, 1.0, 4, 5, 0)
    # 3 views, 2 segments of 4 frames sharing their ends -> 7 frames at the model's 64x64
    assert frames.shape == (7, 64, 64, 3) and 0 <= float(frames.min()) and float(frames.max()) <= 1
    assert isinstance(views, Views) and views.reference_index.tolist() == [0, 3, 6]
    assert views.frames.device == scene.device
    assert (views.reference_cameras.width, views.reference_cameras.height) == (64, 64)
    again, _ = ReconXInterpolate().interpolate(model, scene, "", 2, 7.5, 1.0, 4, 5, 0)
    assert torch.equal(frames, again)


def test_structure_path_changes_frames(use_models):
    (model,) = ReconXVideoModelLoader().load(TINY_VIDEO, TINY_BRANCH, "fp32", "cpu", True)
    scene = plane_scene(2, 48, 64)
    (tokens,) = ReconXEncodePointCloud().encode(scene, model, 1024)
    assert tokens.shape[:2] == (1, 1024 // 8)
    plain, _ = ReconXInterpolate().interpolate(model, scene, "", 2, 7.5, 1.0, 4, 5, 0)
    guided, views = ReconXInterpolate().interpolate(model, scene, "", 2, 7.5, 1.0, 4, 5, 0, structure=tokens)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
    assert views.info["structure"] is True


def test_structure_requested_without_branch_weights_is_a_clear_error(use_models):
    (model,) = ReconXVideoModelLoader().load(TINY_VIDEO, "none", "fp32", "cpu", True)
    scene = plane_scene(2, 48, 64)
    with pytest.raises(InputError, match="no structure branch"):
        ReconXEncodePointCloud().encode(scene, model, 1024)
    with pytest.raises(ResourceError, match="structure branch has no trained weights"):
        ReconXInterpolate().interpolate(model, scene, "", 2, 7.5, 1.0, 4, 5, 0, structure=torch.randn(1, 16, 32))


def test_interpolate_stops_on_interrupt(use_models):
    (model,) = ReconXVideoModelLoader().load(TINY_VIDEO, "none", "fp32", "cpu", True)
    bridge.request_interrupt()
    try:
        with pytest.raises(bridge.Interrupted):
            ReconXInterpolate().interpolate(model, plane_scene(2), "", 3, 7.5, 1.0, 4, 5, 0)
    finally:
        bridge.request_interrupt(False)


def test_encoder_runs_inside_its_offload_stage(use_models, monkeypatch):
    """With staged offload (the default) weights sit on the offload device until `stage` moves them: the node must
    run the encoder inside its stage, or a GPU run mixes devices."""
    from reconx_core.video.model import VideoModel

    staged = []
    original = VideoModel.stage

    def recording_stage(self, module):
        staged.append(module)
        return original(self, module)

    monkeypatch.setattr(VideoModel, "stage", recording_stage)
    (model,) = ReconXVideoModelLoader().load(TINY_VIDEO, TINY_BRANCH, "fp32", "cpu", True)
    calls = []
    model.module.structure_encoder.register_forward_pre_hook(
        lambda module, args: calls.append(module in staged))
    ReconXEncodePointCloud().encode(plane_scene(2, 48, 64), model, 1024)
    assert calls == [True]
