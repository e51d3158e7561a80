"""The README's bad-input table (Troubleshooting), one test per row, plus the frontend's numeric-widget rule.

Each test calls the nodes the way ComfyUI does (keyword widgets, under torch.inference_mode) with the tiny
random-weight models in a temporary models folder, and checks the message a user would read. ComfyUI turns any
exception into an error on the failing node and keeps serving; tests/test_comfyui_integration.py submits the same
rows to a real ComfyUI server (test_real_comfyui_*; it runs when COMFYUI_DIR is set). No ReconX node writes files
(results leave as native types that ComfyUI's save nodes write), so "no partial file" is checked here as: the
working folder and the temporary folder stay empty while a node runs, fails or is interrupted.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from nodes import comfy_bridge as bridge
from nodes.confidence_nodes import ReconXConfidence
from nodes.dust3r_nodes import ReconXDust3rAlign
from nodes.gaussian_nodes import ReconXFitGaussians
from nodes.loader_nodes import ReconXDust3rLoader, ReconXVideoModelLoader
from nodes.video_nodes import ReconXInterpolate
from reconx_core.errors import CheckpointError, InputError, ResourceError
from reconx_core.testing import TINY_DUST3R, TINY_VIDEO
from tests.bad_files import write_bad_checkpoint
from tests.scene_factory import plane_scene

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def models(models_dir, monkeypatch):
    """The tiny models as the pack's model folders; files a test adds are removed afterwards."""
    before = {p for p in models_dir.rglob("*")}
    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", models_dir)
    yield models_dir
    for path in sorted(set(models_dir.rglob("*")) - before, reverse=True):
        path.unlink() if path.is_file() else shutil.rmtree(path)


@pytest.fixture
def no_files_left(tmp_path, monkeypatch):
    """Run in an empty working folder with an empty temporary folder; both must be empty afterwards."""
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    yield
    left = [str(p) for p in list(work.rglob("*")) + list(temp.rglob("*"))]
    assert left == [], f"files left behind: {left}"


def run(node, method: str, *args, **kwargs):
    """Call a node as ComfyUI's executor does: under torch.inference_mode."""
    with torch.inference_mode():
        return getattr(node, method)(*args, **kwargs)


def dust3r(name: str = TINY_DUST3R):
    (model,) = run(ReconXDust3rLoader(), "load", ckpt_name=name, precision="fp32", device="cpu")
    return model


def photo(height: int = 72, width: int = 96, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """A ComfyUI IMAGE of one textured photo, (1, H, W, C) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, 6, 8, generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return image.permute(0, 2, 3, 1).contiguous()


def align(images, model, **kwargs):
    args = dict(scene_graph="complete", iterations=10, learning_rate=0.01, schedule="cosine", min_confidence=1.0,
                batch_size=4, clean_point_cloud=True)
    args.update(kwargs)
    return run(ReconXDust3rAlign(), "align", images, model, **args)


def fit(scene, **kwargs):
    args = dict(steps=10, l1_weight=0.8, ssim_weight=0.2, lpips_weight=0.0, sh_degree=0, densify=False,
                max_points=2000, seed=0)
    args.update(kwargs)
    return run(ReconXFitGaussians(), "fit", scene, **args)


def interrupt_after(monkeypatch, calls: int) -> None:
    """Press cancel after `calls` progress steps (the loops check for an interrupt at every step)."""
    count = {"n": 0}
    original = bridge.check_interrupt

    def check():
        count["n"] += 1
        if count["n"] > calls:
            bridge.request_interrupt()
        original()

    monkeypatch.setattr(bridge, "check_interrupt", check)


@pytest.fixture
def reset_interrupt():
    yield
    bridge.request_interrupt(False)


# ------------------------------------------------------------------------------------------- photos (align node)
def test_one_photo(models):
    with pytest.raises(InputError, match=r"ReconX DUSt3R Global Alignment needs at least 2 views, got 1: connect a "
                                         r"second photo to image_2"):
        align(photo(), dust3r())


def test_tiny_photo(models):
    with pytest.raises(InputError, match=r"photo 2 of 2 is 1x1 pixels; DUSt3R needs at least 64 px on each side"):
        align(photo(), dust3r(), image_2=torch.rand(1, 1, 1, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_pixels(models, bad):
    broken = photo(seed=1)
    broken[0, 5, 7, 1] = bad
    with pytest.raises(InputError, match=r"image_2 has NaN or infinite pixels; check the node that produced it"):
        align(photo(), dust3r(), image_2=broken)


def test_greyscale_photos(models, no_files_left):
    """A one-channel IMAGE (some nodes make them) is expanded to RGB, like a greyscale photo Load Image gives."""
    grey = photo(channels=1)
    scene, depth, _, _ = align(grey, dust3r(), image_2=photo(seed=1, channels=1))
    assert len(scene) == 2 and torch.isfinite(scene.depths).all()
    assert torch.equal(scene.images[:, 0], scene.images[:, 1])  # still grey after the official resize
    with pytest.raises(InputError, match="has 2 channels; expected an RGB IMAGE"):
        align(torch.rand(2, 72, 96, 2), dust3r())


def test_photos_of_different_sizes(models, caplog):
    """Any sizes on separate inputs; another aspect ratio than most is centre-cropped to it, with a warning."""
    shutil.copy(models / "dust3r" / TINY_DUST3R, models / "dust3r" / "tiny_512_dpt.safetensors")  # 512 preprocessing
    model = dust3r("tiny_512_dpt.safetensors")
    with caplog.at_level(logging.WARNING, logger="reconx"):
        scene, _, _, _ = align(photo(96, 128), model, image_2=photo(150, 200, seed=1), image_3=photo(128, 96, seed=2),
                               iterations=5)
    # 4:3 landscape photos -> the official 512x384; the portrait one is cut to 4:3 and resized to it
    assert len(scene) == 3 and (scene.cameras.width, scene.cameras.height) == (512, 384)
    assert "view(s) 3 have another aspect ratio than most photos and were centre-cropped to 512x384" in caplog.text


def test_prepare_views_keeps_the_official_preprocessing():
    """Photos of the common shape come out bit for bit as the official resize and crop (prepare_images) gives them,
    whatever the other photos' sizes; a 224 model's centred squares never need a cut."""
    from reconx_core.dust3r import prepare_images, prepare_views

    a, b, tall = (photo(h, w, seed=s)[0].permute(2, 0, 1) for s, (h, w) in enumerate([(96, 128), (150, 200),
                                                                                       (128, 96)]))
    views, cut = prepare_views([a, b, tall], size=512)
    assert cut == [2] and views.shape == (3, 3, 384, 512)
    assert torch.equal(views[0], prepare_images(a[None], 512)[0]) and torch.equal(views[1], prepare_images(b[None])[0])
    squares, cut = prepare_views([a, tall], size=224)
    assert cut == [] and torch.equal(squares, torch.cat([prepare_images(x[None], 224) for x in (a, tall)]))


def test_batch_images_cropped_the_photos(tmp_path, monkeypatch):
    """Batch Images resizes to the first photo's size: the queued graph and the files' headers show it."""
    from PIL import Image

    from nodes.dust3r_nodes import batch_resize_warnings

    Image.new("RGB", (640, 480)).save(tmp_path / "wide.png")
    Image.new("RGB", (480, 640)).save(tmp_path / "tall.png")
    Image.new("RGB", (1280, 960)).save(tmp_path / "big.png")
    monkeypatch.setattr(bridge, "folder_paths", SimpleNamespace(get_annotated_filepath=lambda n: str(tmp_path / n)))
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "wide.png"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "tall.png"}},
              "3": {"class_type": "LoadImage", "inputs": {"image": "big.png"}},
              "4": {"class_type": "BatchImagesNode",
                    "inputs": {"images.image0": ["1", 0], "images.image1": ["2", 0], "images.image2": ["3", 0]}},
              "5": {"class_type": "ReconXDust3rAlign", "inputs": {"images": ["4", 0]}}}
    warnings = batch_resize_warnings(prompt, "5")
    assert len(warnings) == 2
    assert warnings[0].startswith("Batch Images cropped photo 2 (tall.png, 480x640) to the first photo's aspect "
                                  "ratio (wide.png, 640x480), dropping 44% of it")
    assert warnings[1].startswith("Batch Images resized photo 3 (big.png, 1280x960) to the first photo's 640x480")
    prompt["2"]["inputs"]["image"] = prompt["3"]["inputs"]["image"] = "wide.png"
    assert batch_resize_warnings(prompt, "5") == []  # same sizes: nothing happened to them
    assert batch_resize_warnings(None, None) == []  # outside ComfyUI


def test_two_views_log_no_nan_loss(models, caplog):
    """Two views use DUSt3R's pair viewer, which has no loss: the log says so instead of 'loss nan'."""
    with caplog.at_level(logging.INFO, logger="reconx"):
        align(photo(), dust3r(), image_2=photo(seed=1))
    assert "aligned 2 views with DUSt3R's pair viewer" in caplog.text and "nan" not in caplog.text.lower()


# -------------------------------------------------------------------------------------- model files (loaders)
def test_missing_model_file(models):
    with pytest.raises(CheckpointError, match=r"model file 'absent.pth' not found in models/dust3r"):
        dust3r("absent.pth")


def test_template_without_its_model_files_is_reported_when_queued(models):
    """The loaders' VALIDATE_INPUTS name a missing file when the prompt is queued (the loaders' owner's code)."""
    message = ReconXDust3rLoader.VALIDATE_INPUTS(ckpt_name="DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth")
    assert "'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth' is not in models/dust3r; put it there" in message
    assert ReconXDust3rLoader.VALIDATE_INPUTS(ckpt_name=TINY_DUST3R) is True


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_checkpoint(models, suffix):
    name = write_bad_checkpoint(models / "dust3r", f"truncated{suffix}", models / "dust3r" / TINY_DUST3R)
    with pytest.raises(CheckpointError, match=r"is damaged.*(?i:download) the DUSt3R/MASt3R checkpoint again"):
        dust3r(name)


def test_random_bytes_checkpoint_is_called_damaged(models):
    name = write_bad_checkpoint(models / "dust3r", "random", models / "dust3r" / TINY_DUST3R)
    with pytest.raises(CheckpointError) as error:
        dust3r(name)
    assert "damaged" in str(error.value) and "other than tensors" not in str(error.value)


def test_malicious_checkpoint_is_refused_and_never_run(models, tmp_path):
    marker = tmp_path / "ran"
    name = write_bad_checkpoint(models / "dust3r", "malicious", models / "dust3r" / TINY_DUST3R, marker)
    with pytest.raises(CheckpointError, match=r"system"):
        dust3r(name)
    assert not marker.exists()


def test_video_model_in_the_dust3r_loader(models):
    shutil.copy(models / "reconx" / TINY_VIDEO, models / "dust3r" / "video.safetensors")
    with pytest.raises(CheckpointError, match=r"DynamiCrafter.*ReconX Video Model Loader"):
        dust3r("video.safetensors")


def test_dust3r_model_in_the_video_loader(models):
    shutil.copy(models / "dust3r" / TINY_DUST3R, models / "reconx" / "dust3r.safetensors")
    with pytest.raises(CheckpointError, match=r"DUSt3R.*ReconX DUSt3R Loader"):
        run(ReconXVideoModelLoader(), "load", ckpt_name="dust3r.safetensors", structure_name="none",
            precision="fp32", device="cpu", staged_offload=True)


def test_dust3r_checkpoint_of_mixed_sizes(models):
    """A file whose tensors belong to DUSt3R networks of different sizes (edited, or two models merged)."""
    state = load_file(str(models / "dust3r" / TINY_DUST3R))
    key = "enc_blocks.1.mlp.fc1.weight"
    state[key] = torch.zeros(2 * state[key].shape[0], state[key].shape[1])
    save_file(state, str(models / "dust3r" / "mixed.safetensors"))
    with pytest.raises(CheckpointError, match=r"is not one consistent DUSt3R/MASt3R network.*official checkpoint"):
        dust3r("mixed.safetensors")


def test_structure_branch_for_another_backbone(models):
    """A structure-branch file saved with a video model of another size does not fit this one."""
    from reconx_core.video import build_video_model, save_structure_branch, tiny_config

    config = tiny_config()
    config["unet"] = dict(config["unet"], model_channels=2 * config["unet"]["model_channels"])
    other = build_video_model(config, structure_encoder=True, seed=1)
    save_structure_branch(other, models / "reconx" / "other_branch.safetensors")
    with pytest.raises(CheckpointError, match=r"other_branch.safetensors (does not fit|was saved for a video model "
                                              r"of another size)"):
        run(ReconXVideoModelLoader(), "load", ckpt_name=TINY_VIDEO, structure_name="other_branch.safetensors",
            precision="fp32", device="cpu", staged_offload=True)


def test_structure_branch_trained_for_another_backbone(models):
    """A branch of the right size whose metadata names another video backbone (ViewCrafter) is refused for
    DynamiCrafter, by name."""
    from reconx_core.video import build_video_model, save_structure_branch, tiny_config

    other = build_video_model(tiny_config(), structure_encoder=True, seed=1)
    other.config["backbone"] = "viewcrafter_25_512"
    save_structure_branch(other, models / "reconx" / "viewcrafter_branch.safetensors")
    with pytest.raises(CheckpointError, match=r"structure branch was trained for the viewcrafter_25_512 video "
                                              r"backbone, but this video model runs as dynamicrafter_512_interp"):
        run(ReconXVideoModelLoader(), "load", ckpt_name=TINY_VIDEO, structure_name="viewcrafter_branch.safetensors",
            precision="fp32", device="cpu", staged_offload=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="half precision is refused only without a GPU")
def test_half_precision_on_the_cpu(models):
    with pytest.raises(InputError, match="precision 'fp16' needs a CUDA GPU; choose 'fp32' or 'auto'"):
        run(ReconXDust3rLoader(), "load", ckpt_name=TINY_DUST3R, precision="fp16", device="cpu")


# --------------------------------------------------------------------------------- resources a graph needs (fit)
def test_missing_lpips_backbone_is_reported_when_queued(monkeypatch, tmp_path):
    """VALIDATE_INPUTS runs when the prompt is queued: the same message as the fit, before anything runs."""
    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", tmp_path / "models")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    message = ReconXFitGaussians.VALIDATE_INPUTS(lpips_weight=0.5)
    assert isinstance(message, str) and message.startswith("ReconX Fit Gaussians: LPIPS needs the torchvision "
                                                           "backbone alexnet-owt-7be5be79.pth")
    for part in (str(tmp_path / "models" / "reconx"), "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                 "lpips_weight", "to 0"):
        assert part in message
    with pytest.raises(ResourceError) as error:
        fit(plane_scene(2, 48, 64), lpips_weight=0.5)
    assert message == f"ReconX Fit Gaussians: {error.value}"
    assert ReconXFitGaussians.VALIDATE_INPUTS(lpips_weight=0.0) is True  # the escape
    assert ReconXFitGaussians.VALIDATE_INPUTS() is True  # a linked weight is checked by the fit itself
    # naming lpips_weight in VALIDATE_INPUTS turns off ComfyUI's range check for it: ours replaces it
    assert "outside [0.0, 10.0]" in ReconXFitGaussians.VALIDATE_INPUTS(lpips_weight=-1.0)
    (tmp_path / "models" / "reconx").mkdir(parents=True)
    (tmp_path / "models" / "reconx" / "alexnet-owt-7be5be79.pth").write_bytes(b"")  # found by name, not read
    assert ReconXFitGaussians.VALIDATE_INPUTS(lpips_weight=0.5) is True


# ------------------------------------------------------------------------------------------------- interrupts
def test_interrupt_in_align(models, monkeypatch, reset_interrupt, no_files_left):
    model = dust3r()
    interrupt_after(monkeypatch, 3)  # in the alignment's optimiser loop (one pair + two steps)
    with pytest.raises(bridge.Interrupted):
        align(photo(), model, image_2=photo(seed=1), image_3=photo(seed=2), iterations=50)


def test_interrupt_in_interpolate(models, monkeypatch, reset_interrupt, no_files_left):
    (model,) = run(ReconXVideoModelLoader(), "load", ckpt_name=TINY_VIDEO, structure_name="none", precision="fp32",
                   device="cpu", staged_offload=True)
    interrupt_after(monkeypatch, 2)  # after two of six DDIM steps
    with pytest.raises(bridge.Interrupted):
        run(ReconXInterpolate(), "interpolate", model, plane_scene(2, 48, 64), prompt="", steps=3, cfg=7.5,
            structure_scale=1.0, frames=4, frame_stride=5, seed=0)


def test_interrupt_in_fit(monkeypatch, reset_interrupt, no_files_left):
    interrupt_after(monkeypatch, 5)
    with pytest.raises(bridge.Interrupted):
        fit(plane_scene(2, 48, 64), steps=50)
    bridge.request_interrupt(False)
    monkeypatch.setattr(bridge, "check_interrupt", lambda: None)
    fit(plane_scene(2, 48, 64))  # a whole fit leaves no file either (its PLY is built in memory)


# ---------------------------------------------------------------------------------- wrong connections and names
def test_wrong_inputs_name_the_node_to_connect(models):
    with pytest.raises(InputError, match="dust3r must come from the ReconX DUSt3R Loader"):
        align(photo(), "not a model")
    with pytest.raises(InputError, match="connect the scene output of ReconX DUSt3R Global Alignment"):
        fit("not a scene")
    with pytest.raises(InputError, match="connect the views output of ReconX Interpolate Views"):
        run(ReconXConfidence(), "map_confidence", "not views", dust3r())


def _string_constants(path: Path):
    """Every string literal in a Python file (implicitly joined strings as one; f-strings' literal parts joined)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        elif isinstance(node, ast.JoinedStr):
            yield "".join(v.value for v in node.values if isinstance(v, ast.Constant))


# Mentions in files other owners maintain, each with the change it needs; remove an entry once it is fixed.
KNOWN_MISNAMED: dict = {}  # (file, name) -> what to say instead, for a wrong name not fixed yet


def test_messages_name_nodes_by_their_titles():
    """'ReconX Something' in any message, tooltip or note is a title users see (its parenthesised part optional)."""
    titles = set(NODE_DISPLAY_NAME_MAPPINGS.values())
    titles |= {re.sub(r"\s*\(.*\)$", "", t) for t in titles}
    files = sorted(REPO.glob("nodes/*.py")) + sorted(REPO.glob("reconx_core/**/*.py"))
    files.append(REPO / "scripts" / "build_example_workflows.py")
    found = set()
    for path in files:
        for text in _string_constants(path):
            for mention in re.findall(r"ReconX(?: [A-Z0-9][\w-]*)+", text):
                if mention not in titles:
                    found.add((str(path.relative_to(REPO)), mention))
    assert found == set(KNOWN_MISNAMED), f"not a node title: {sorted(found - set(KNOWN_MISNAMED))}"


# --------------------------------------------------------------------------------------- numeric widgets
def frontend_int(value, opts):
    """The value ComfyUI's frontend (1.49, useIntWidget's onValueChange) stores when `value` is typed in."""
    step = opts.get("step", 1)
    if step == 1:
        return round(value)
    offset = math.fmod(opts.get("min", 0), step)  # JavaScript's %: the sign of the dividend
    return round((value - offset) / step) * step + offset


def frontend_float(value, opts):
    """The value ComfyUI's frontend (useFloatWidget's onFloatValueChange) stores: rounded to 10^-precision, where
    precision = -floor(log10(step)) (the default setting), then clamped to [min, max]."""
    precision = max(0, -math.floor(math.log10(opts.get("step", 0.5))))
    grid = opts.get("round", 10.0 ** -precision)
    if grid:
        value = round(round(value / grid) * grid, precision)
    return min(max(value, opts.get("min", -math.inf)), opts.get("max", math.inf))


def numeric_widgets():
    for node, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, decl in spec.get(section, {}).items():
                if decl[0] in ("INT", "FLOAT"):
                    yield node, name, decl[0], decl[1]


# Widgets in files other owners maintain that break the rule, each with the change it needs.
KNOWN_UNREACHABLE: dict = {}  # (node, input) -> the fix, for a widget value not reachable yet


@pytest.mark.parametrize("node, name, kind, opts", [
    pytest.param(*w, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_UNREACHABLE[w[:2]])]
                 if w[:2] in KNOWN_UNREACHABLE else [], id=f"{w[0]}.{w[1]}") for w in numeric_widgets()])
def test_numeric_widget_values_are_reachable_in_the_frontend(node, name, kind, opts):
    """Default, min, max and the step's multiples survive the frontend's snapping. The frontend's own bounds
    (min 0, max 2048) differ from the server's (none), so each widget states both."""
    assert "min" in opts and "max" in opts, f"{node}.{name} needs an explicit min and max"
    assert opts["min"] <= opts["default"] <= opts["max"]
    if kind == "INT":
        step = opts.get("step", 1)
        # the frontend keeps min + k * step: round numbers need a min that is a multiple of the step
        assert opts["min"] % step == 0, f"{node}.{name}: min {opts['min']} is not a multiple of step {step}"
        for value in (opts["default"], opts["min"], opts["max"], opts["min"] + step, opts["max"] - step):
            assert frontend_int(value, opts) == value, f"{node}.{name}: {value} becomes {frontend_int(value, opts)}"
    else:
        step = opts.get("step", 0.5)
        for value in (opts["default"], opts["min"], opts["max"], opts["min"] + step, opts["default"] + step):
            if value <= opts["max"]:
                stored = frontend_float(value, opts)
                assert abs(stored - value) <= 1e-9 * max(1.0, abs(value)), f"{node}.{name}: {value} becomes {stored}"


def test_frontend_rule_reproduces_the_reported_snapping():
    """The issue's observation: min 1 with step 50 turns 1000 into 1001, 30 into 51 and 2000 into 2001."""
    old = {"min": 1, "max": 30000, "step": 50}
    assert [frontend_int(v, old) for v in (1000, 30, 2000)] == [1001, 51, 2001]
    steps = ReconXFitGaussians.INPUT_TYPES()["required"]["steps"][1]
    assert [frontend_int(v, steps) for v in (1000, 30, 2000)] == [1000, 30, 2000]


def test_every_row_of_the_readme_table_names_a_test_here():
    """The README's bad-input table (Troubleshooting) lists the test behind each row; each must exist here."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Troubleshooting")
    section = readme[start:readme.index("\n## ", start + 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    assert len(rows) >= 19
    for row in rows:
        names = re.findall(r"`(test_\w+)`", row.rsplit("|", 2)[-2])
        assert names, f"no test named in: {row[:80]}"
        for name in names:
            assert callable(globals().get(name)), f"{name} (README) is not a test in {Path(__file__).name}"
