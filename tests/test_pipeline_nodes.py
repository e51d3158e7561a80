"""The whole ReconX chain of nodes, called as the example workflow wires them (tiny random models, inference
mode as in ComfyUI): every container a node returns keeps its tensors on the compute device, and no stage after
the input photos goes through numpy (no CPU/file round trips between our nodes).

On a CPU-only machine the compute device is a stand-in accelerator (tests/fake_device.py): tensors on it are not
CPU tensors, so a stage that moves data to the CPU, or makes a tensor without `device=`, is caught here as it
would be on a GPU."""

import contextlib
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
from tests.fake_device import FAKE_DEVICE, FakeAccelerator, MixedDeviceError, on_fake_device

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
        # the first caller outside torch, the stand-in device's dispatch code and this guard itself (the stand-in
        # device calls the patched method again)
        caller = next(f.filename for f in inspect.stack()[1:]
                      if not f.filename.endswith("fake_device.py") and "/torch/" not in f.filename
                      and f.function != "guarded")
        if not caller.endswith(NUMPY_ALLOWED):
            calls.append(caller)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", guarded)
    return calls


def run_chain(photos, iterations=20, fit_steps=20):
    """Every ReconX node in the order of the example workflow; returns the containers they output."""
    with torch.inference_mode():
        (dust3r,) = ReconXDust3rLoader().load(TINY_DUST3R, "auto", "auto")
        scene, depth, conf_mask, ply = ReconXDust3rAlign().align(photos, dust3r, "complete", iterations, 0.01,
                                                                 "cosine", 1.0, 4, True)
        (video,) = ReconXVideoModelLoader().load(TINY_VIDEO, TINY_BRANCH, "auto", "auto", True)
        (tokens,) = ReconXEncodePointCloud().encode(scene, video, 2048)
        frames, views = ReconXInterpolate().interpolate(video, scene, "", 2, 7.5, 1.0, 4, 5, 0, structure=tokens)
        mapped, frame_conf, _ = ReconXConfidence().map_confidence(views, dust3r, 2, iterations, 4)
        splat, gaussian_ply = ReconXFitGaussians().fit(scene, fit_steps, 0.8, 0.2, 0.0, 1, False, 3000, 0,
                                                       views=mapped)
        rendered, rendered_depth, alpha = ReconXRenderGaussians().render(splat, scene, "through cameras", 3, 0, 0)
    return {"scene": scene, "depth": depth, "confidence": conf_mask, "tokens": tokens, "frames": frames,
            "views": views, "mapped": mapped, "frame_conf": frame_conf, "splat": splat, "rendered": rendered,
            "rendered_depth": rendered_depth, "alpha": alpha}


def photos():
    left, right, _ = stereo_motorcycle()
    return torch.from_numpy(np.stack([left[::4, ::4], right[::4, ::4]]).astype(np.float32) / 255)


def test_full_chain_keeps_tensors_on_the_device(models, numpy_guard, monkeypatch, one_thread):
    """Run on the real accelerator when there is one, else on the stand-in: either way the check can fail."""
    if torch.cuda.is_available():
        device, accelerator = torch.device("cuda"), contextlib.nullcontext()
        on_device = lambda t: t.device.type == "cuda"  # noqa: E731
    else:
        device, accelerator, on_device = FAKE_DEVICE, FakeAccelerator(), on_fake_device
        monkeypatch.setattr(bridge, "compute_device", lambda: FAKE_DEVICE)
    images = photos()
    with accelerator:
        out = run_chain(images, iterations=5, fit_steps=5)
    off = [f"{path} ({tuple(t.shape)}) is on {t.device}" for name, container in out.items()
           for path, t in tensors_of(container, name) if not on_device(t)]
    assert off == [], f"tensors left the compute device {device}: {off}"
    assert isinstance(out["scene"], Scene) and isinstance(out["mapped"], Views)
    assert out["mapped"].cameras is not None and out["mapped"].conf is not None and len(out["mapped"]) == 4
    assert out["rendered"].shape[0] == 3
    assert numpy_guard == [], f"numpy round trips between nodes from {sorted(set(numpy_guard))}"


def test_the_stand_in_device_catches_a_stage_that_moves_data(models, monkeypatch, one_thread):
    """The check above is only worth something if it fails when a stage moves data off the device: make the
    depth preview of the alignment node go through the CPU, and see it caught; and a tensor made without
    `device=` meeting device data must raise, as on CUDA."""
    import reconx_core.preview as preview

    monkeypatch.setattr(bridge, "compute_device", lambda: FAKE_DEVICE)
    real = preview.depth_preview
    monkeypatch.setattr(preview, "depth_preview", lambda *a, **k: real(*a, **k).cpu())  # the node imports it per call
    images = photos()
    with FakeAccelerator(), torch.inference_mode():
        (dust3r,) = ReconXDust3rLoader().load(TINY_DUST3R, "auto", "auto")
        scene, depth, _, _ = ReconXDust3rAlign().align(images, dust3r, "complete", 2, 0.01, "cosine", 1.0, 4, True)
        assert on_fake_device(scene.pts3d) and not on_fake_device(depth)
        with pytest.raises(MixedDeviceError):
            scene.pts3d + torch.ones(scene.pts3d.shape)
