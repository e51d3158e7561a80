"""The whole ReconX chain of nodes, called as the example workflow wires them (tiny random models, inference
mode as in ComfyUI): every container a node returns keeps its tensors on the compute device, and no stage after
the input photos goes through numpy (no CPU/file round trips between our nodes)."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from skimage.data import stereo_motorcycle

from nodes import comfy_bridge as bridge
from nodes.confidence_nodes import ReconXConfidence
from nodes.dust3r_nodes import ReconXDust3rAlign
from nodes.gaussian_nodes import ReconXFitGaussians, ReconXRenderGaussians
from nodes.loader_nodes import ReconXDust3rLoader, ReconXVideoModelLoader
from nodes.video_nodes import ReconXEncodePointCloud, ReconXInterpolate
from reconx_core.testing import TINY_BRANCH, TINY_DUST3R, TINY_VIDEO, write_tiny_models
from reconx_core.types import Scene, Views

# Modules allowed to use numpy: the input boundary (DUSt3R's official PIL preprocessing of the photos) and the
# file exports whose whole point is to leave the device (PLY bytes for ComfyUI's viewers).
NUMPY_ALLOWED = ("reconx_core/dust3r/preprocess.py", "reconx_core/export.py", "reconx_core/gaussians/ply.py")


def tensors_of(obj, prefix="out"):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from tensors_of(getattr(obj, f.name), f"{prefix}.{f.name}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_of(v, f"{prefix}[{k!r}]")
    elif hasattr(obj, "positions"):  # SPLAT
        for name in ("positions", "scales", "rotations", "opacities", "sh"):
            yield f"{prefix}.{name}", getattr(obj, name)


@pytest.fixture
def models(tmp_path, monkeypatch):
    write_tiny_models(tmp_path)
    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", tmp_path)


@pytest.fixture
def numpy_guard(monkeypatch):
    calls = []
    original = torch.Tensor.numpy

    def guarded(self, *args, **kwargs):
        caller = inspect.stack()[1].filename
        if not caller.endswith(NUMPY_ALLOWED):
            calls.append(caller)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", guarded)
    return calls


def test_full_chain_keeps_tensors_on_the_device(models, numpy_guard):
    device = bridge.compute_device()
    left, right, _ = stereo_motorcycle()
    photos = torch.from_numpy(np.stack([left[::4, ::4], right[::4, ::4]]).astype(np.float32) / 255)
    with torch.inference_mode():
        (dust3r,) = ReconXDust3rLoader().load(TINY_DUST3R, "auto", "auto")
        scene, depth, conf_mask, ply = ReconXDust3rAlign().align(photos, dust3r, "complete", 20, 0.01, "cosine",
                                                                 1.0, 4, True)
        (video,) = ReconXVideoModelLoader().load(TINY_VIDEO, TINY_BRANCH, "auto", "auto", True)
        (tokens,) = ReconXEncodePointCloud().encode(scene, video, 2048)
        frames, views = ReconXInterpolate().interpolate(video, scene, "", 2, 7.5, 1.0, 4, 5, 0, structure=tokens)
        mapped, frame_conf, _ = ReconXConfidence().map_confidence(views, dust3r, 2, 20, 4)
        splat, gaussian_ply = ReconXFitGaussians().fit(scene, 20, 0.8, 0.2, 0.0, 1, False, 3000, 0, views=mapped)
        rendered, rendered_depth, alpha = ReconXRenderGaussians().render(splat, scene, "through cameras", 3, 0, 0)
    assert isinstance(scene, Scene) and isinstance(mapped, Views)
    assert mapped.cameras is not None and mapped.conf is not None and len(mapped) == 4
    for name, container in (("scene", scene), ("tokens", tokens), ("views", views), ("mapped", mapped),
                            ("splat", splat)):
        for path, tensor in tensors_of(container, name):
            assert tensor.device.type == device.type, f"{path} is on {tensor.device}, not {device}"
    assert rendered.shape[0] == 3 and float(alpha.mean()) > 0
    assert numpy_guard == [], f"numpy round trips between nodes from {sorted(set(numpy_guard))}"
