"""Video backbones: which checkpoint is which, the settings each brings, and one node graph for either backbone.

The tiny models (reconx_core.testing) stand in for the real checkpoints: a tiny DynamiCrafter and a tiny ViewCrafter
(same architecture, other weights, saved as backbone viewcrafter_25_512 with 4-frame segments).
"""

import pytest
import torch

from nodes.loader_nodes import ReconXVideoModelLoader
from nodes.structure_nodes import ReconXRenderPointCloud
from nodes.video_nodes import ReconXInterpolate
from reconx_core.errors import CheckpointError, InputError
from reconx_core.testing import TINY_VIDEO, TINY_VIEWCRAFTER
from reconx_core.types import Views
from reconx_core.video import backbone_names, build_video_model, get_backbone, tiny_config
from reconx_core.video.backbones import backbone_from_file_name, configure_model, resolve_backbone
from reconx_core.video.schedule import DiffusionSchedule
from tests.scene_factory import plane_scene


@pytest.mark.parametrize("filename, name, specific", [
    ("dynamicrafter_512_interp.ckpt", "dynamicrafter_512_interp", False),
    ("ViewCrafter_25_512.ckpt", "viewcrafter_25_512", True),
    ("viewcrafter_25.ckpt", "viewcrafter_25_1024", True),
    ("viewcrafter_25_sparse.ckpt", "viewcrafter_25_1024", True),
    ("model_sparse.ckpt", "viewcrafter_25_1024", True),          # ViewCrafter_25_sparse's own file name
    ("ViewCrafter_16.ckpt", "viewcrafter_16_1024", True),
    ("my_viewcrafter.safetensors", "viewcrafter_25_1024", False),  # the family only: its default member
])
def test_file_names(filename, name, specific):
    backbone, is_specific = backbone_from_file_name(filename)
    assert (backbone.name, is_specific) == (name, specific)
    assert resolve_backbone("auto", filename).name == name


def test_names_that_say_nothing_are_dynamicrafter_and_every_choice_is_allowed():
    assert backbone_from_file_name("model.ckpt") == (None, False)
    assert resolve_backbone("auto", "model.ckpt").name == "dynamicrafter_512_interp"
    for name in backbone_names():
        assert resolve_backbone(name, "model.ckpt").name == name   # the tensors cannot contradict it


def test_contradicting_choices_are_clear_errors():
    with pytest.raises(CheckpointError, match="says ViewCrafter_25_512.*'dynamicrafter_512_interp'"):
        resolve_backbone("dynamicrafter_512_interp", "ViewCrafter_25_512.ckpt")
    with pytest.raises(CheckpointError, match="says DynamiCrafter 512 interp"):
        resolve_backbone("viewcrafter_25_512", "dynamicrafter_512_interp.ckpt")
    with pytest.raises(CheckpointError, match="choose 'viewcrafter_25_1024'"):
        resolve_backbone("viewcrafter_25_512", "model_sparse.ckpt")
    assert resolve_backbone("viewcrafter_25_512", "my_viewcrafter.ckpt").name == "viewcrafter_25_512"
    with pytest.raises(CheckpointError, match="saved as a ViewCrafter_25_512 model"):
        resolve_backbone("dynamicrafter_512_interp", "tiny.safetensors", {"backbone": "viewcrafter_25_512"})
    # a dynamic-rescale table ending at 0.3 is the 576x1024 configuration's
    table_1024 = DiffusionSchedule.official(base_scale=0.3).scale_arr
    with pytest.raises(CheckpointError, match="ending at 0.30.*1024 ViewCrafter"):
        resolve_backbone("viewcrafter_25_512", "model.ckpt", scale_arr=table_1024)
    assert resolve_backbone("viewcrafter_25_1024", "model.ckpt", scale_arr=table_1024).name == "viewcrafter_25_1024"
    with pytest.raises(InputError, match="unknown video backbone"):
        get_backbone("sora")


def test_settings_each_backbone_brings():
    dc, vc512, vc1024, vc16 = (get_backbone(n) for n in ("dynamicrafter_512_interp", "viewcrafter_25_512",
                                                          "viewcrafter_25_1024", "viewcrafter_16_1024"))
    assert (dc.resolution, dc.frames, dc.frame_stride, dc.prompt, dc.pin_ends) == ((320, 512), 16, 5, "", True)
    assert not dc.needs_renders and not dc.final_prev_from_start
    for vc in (vc512, vc1024, vc16):
        assert (vc.frame_stride, vc.prompt, vc.steps, vc.cfg, vc.guidance_rescale, vc.eta) == \
            (10, "Rotating view of a scene", 50, 7.5, 0.7, 1.0)
        assert vc.needs_renders and vc.final_prev_from_start and not vc.pin_ends and vc.path == "viewcrafter"
    assert (vc512.resolution, vc512.frames, vc512.base_scale, vc512.render_downsample) == ((320, 512), 25, 0.7, 1)
    assert (vc1024.resolution, vc1024.frames, vc1024.base_scale, vc1024.render_downsample) == ((576, 1024), 25, 0.3, 2)
    assert (vc16.resolution, vc16.frames) == ((576, 1024), 16)


def test_configure_model_without_a_stored_config():
    """A real checkpoint carries no config: the backbone sets size, frames, fs and the rescale table."""
    model = build_video_model(tiny_config(), device="meta")
    configure_model(model, get_backbone("viewcrafter_25_1024"))
    assert model.config["resolution"] == [576, 1024] and model.config["frames"] == 25
    assert model.config["frame_stride"] == 10 and model.config["backbone"] == "viewcrafter_25_1024"
    assert abs(float(model.schedule.scale_arr[-1]) - 0.3) < 1e-6 and float(model.schedule.scale_arr[0]) == 1.0
    # the checkpoint's own table wins (the official load is strict)
    table = DiffusionSchedule.official(base_scale=0.5).scale_arr
    configure_model(model, get_backbone("viewcrafter_25_1024"), scale_arr=table)
    assert torch.equal(model.schedule.scale_arr, table)


def test_loader_reads_the_backbone_and_refuses_a_wrong_one(use_models):
    assert "backbone" in ReconXVideoModelLoader.INPUT_TYPES()["optional"]
    (dc,) = ReconXVideoModelLoader().load(TINY_VIDEO, "none", "fp32", "cpu", True)
    (vc,) = ReconXVideoModelLoader().load(TINY_VIEWCRAFTER, "none", "fp32", "cpu", True)
    assert dc.module.config["backbone"] == "dynamicrafter_512_interp"
    assert vc.module.config["backbone"] == "viewcrafter_25_512" and vc.module.config["frames"] == 4
    with pytest.raises(CheckpointError, match="ReconX Video Model Loader: .*saved as a ViewCrafter_25_512"):
        ReconXVideoModelLoader().load(TINY_VIEWCRAFTER, "none", "fp32", "cpu", True,
                                      backbone="dynamicrafter_512_interp")


def run_graph(ckpt, scene, **interp):
    """Loader -> Render Point Cloud (following the model) -> Interpolate: the same graph for every backbone."""
    (model,) = ReconXVideoModelLoader().load(ckpt, "none", "fp32", "cpu", True)
    images, coverage, renders = ReconXRenderPointCloud().render(scene, "auto", 0, 0, 0, 0.0, 0, video_model=model)
    settings = dict(prompt="", steps=2, cfg=7.5, structure_scale=1.0, frames=0, frame_stride=0, seed=0)
    settings.update(interp)
    frames, views = ReconXInterpolate().interpolate(model, scene, renders=renders, **settings)
    return model, images, coverage, renders, frames, views


@pytest.mark.parametrize("ckpt", [TINY_VIDEO, TINY_VIEWCRAFTER])
def test_the_same_graph_runs_with_either_backbone(use_models, ckpt):
    scene = plane_scene(3, 48, 64)
    guidance = {"guidance": "x0 fusion"} if ckpt == TINY_VIDEO else {}
    model, images, coverage, renders, frames, views = run_graph(ckpt, scene, **guidance)
    S = 2 * (4 - 1) + 1                                   # tiny models: 4-frame segments at 64x64
    assert images.shape == (S, 64, 64, 3) and coverage.shape == (S, 64, 64)
    assert renders.path == ("viewcrafter" if ckpt == TINY_VIEWCRAFTER else "linear")
    assert frames.shape == (S, 64, 64, 3) and isinstance(views, Views)
    assert views.info["backbone"] == model.module.config["backbone"]
    # renders guided the model (ViewCrafter's condition, DynamiCrafter's x0 fusion): the path is kept
    assert views.intended_cameras is not None
    torch.testing.assert_close(views.intended_cameras.cam_to_world, renders.cameras.cam_to_world)
    torch.testing.assert_close(views.intended_cameras.cam_to_world[views.reference_index],
                               views.reference_cameras.cam_to_world, atol=1e-5, rtol=0)


def test_viewcrafter_refuses_other_segment_lengths_and_mismatched_renders(use_models):
    scene = plane_scene(2, 48, 64)
    (model,) = ReconXVideoModelLoader().load(TINY_VIEWCRAFTER, "none", "fp32", "cpu", True)
    with pytest.raises(InputError, match="Interpolate Views.*trained on 4-frame segments; set frames to 4"):
        ReconXInterpolate().interpolate(model, scene, "", 1, 7.5, 1.0, 6, 0, 0)
    _, _, renders = ReconXRenderPointCloud().render(scene, "auto", 0, 128, 64, 0.0, 0)
    with pytest.raises(InputError, match="renders do not fit.*128x64.*64x64"):
        ReconXInterpolate().interpolate(model, scene, "", 1, 7.5, 1.0, 0, 0, 0, renders=renders)
