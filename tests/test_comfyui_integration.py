"""Every example workflow, submitted to a real ComfyUI server with this pack and tiny random-weight models.

Skipped unless COMFYUI_DIR points to a ComfyUI source tree with its venv beside it (../venv, or COMFYUI_VENV).
The scripts that start the server come from RECONX_COMFY_TOOLS (shared/tools/comfyui), found by themselves when
this repository sits beside ../shared or RECONX_FIXTURES points at shared/fixtures; with COMFYUI_DIR set and no
tools found the tests fail naming RECONX_COMFY_TOOLS. Set-up: shared/tools/comfyui/README.md.
By hand: `COMFYUI_DIR=... RECONX_COMFY_TOOLS=... .venv/bin/python tests/comfyui_harness.py`.
"""

import json
import os
import re
from pathlib import Path

import pytest

from tests import comfyui_harness

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
needs_comfyui = pytest.mark.skipif(
    not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no real ComfyUI to run against; set COMFYUI_DIR to a ComfyUI "
    "source tree and, unless the pack sits beside ../shared, RECONX_COMFY_TOOLS to shared/tools/comfyui)")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        srv = comfyui_harness.ComfyServer(Path(COMFYUI_DIR), tmp_path_factory.mktemp("comfyui"))
        setup_problem = None
    except FileNotFoundError as error:
        setup_problem = str(error)
    if setup_problem:  # say which variable to set, without a traceback (outside `except`: no chained exception)
        pytest.fail(setup_problem, pytrace=False)
    srv.start()
    yield srv
    srv.stop()


def make_tools(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in comfyui_harness.TOOL_FILES:
        (folder / name).write_text("")
    return folder


def test_tools_not_found_names_the_variable(tmp_path, monkeypatch):
    """A pack cloned away from ../shared with COMFYUI_DIR set: the error says to set RECONX_COMFY_TOOLS."""
    monkeypatch.setattr(comfyui_harness, "REPO", tmp_path / "pack")
    monkeypatch.delenv("RECONX_COMFY_TOOLS", raising=False)
    monkeypatch.delenv("RECONX_FIXTURES", raising=False)
    with pytest.raises(FileNotFoundError, match="RECONX_COMFY_TOOLS"):
        comfyui_harness.find_tools()
    monkeypatch.setenv("RECONX_COMFY_TOOLS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="RECONX_COMFY_TOOLS"):
        comfyui_harness.find_tools()


def test_tools_are_found_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("RECONX_COMFY_TOOLS", raising=False)
    monkeypatch.setattr(comfyui_harness, "REPO", tmp_path / "elsewhere" / "pack")
    beside_fixtures = make_tools(tmp_path / "shared" / "tools" / "comfyui")
    monkeypatch.setenv("RECONX_FIXTURES", str(tmp_path / "shared" / "fixtures"))
    assert comfyui_harness.find_tools() == beside_fixtures
    beside_repo = make_tools(tmp_path / "elsewhere" / "shared" / "tools" / "comfyui")
    assert comfyui_harness.find_tools() == beside_repo  # the repository's neighbour comes before RECONX_FIXTURES's
    explicit = make_tools(tmp_path / "mine")
    monkeypatch.setenv("RECONX_COMFY_TOOLS", str(explicit))
    assert comfyui_harness.find_tools() == explicit


@needs_comfyui
def test_templates_are_listed(server):
    templates = server.get("/api/workflow_templates")
    assert sorted(templates.get(REPO.name, [])) == EXAMPLES


@needs_comfyui
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_workflow_runs(server, name):
    result = server.run_example(name)
    assert result["rc"] == 0, result["log"][-4000:]
    outputs = json.dumps(result["history"])
    # every preview/save node produced its file
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] in ("PreviewPointCloud", "PreviewGaussianSplat"):
            assert ".ply" in outputs
        if node["type"] == "SaveAnimatedWEBP":
            prefix = node["widgets_values"][0]
            assert list(server.output.glob(prefix + "*.webp")), f"no {prefix}*.webp in {server.output}"


@needs_comfyui
def test_structure_guided_pipeline_runs(server):
    """The two-view pipeline with the structure branch switched on (tiny branch weights, non-zero gates)."""
    result = server.run_example("reconx_two_views", structure=True)
    assert result["rc"] == 0, result["log"][-4000:]
    assert "executing node 8" in result["log"]  # ReconX Encode Point Cloud ran


@needs_comfyui
def test_render_init_guidance_runs(server):
    """The render-guided template with sampling started from the noised renders and fused (issue 10's third mode)."""
    result = server.run_example("reconx_render_guided",
                                overrides={"ReconXInterpolate": {"guidance": "render init + x0 fusion"}})
    assert result["rc"] == 0, result["log"][-4000:]


@needs_comfyui
def test_wrong_backbone_for_a_checkpoint_is_a_clear_error(server):
    """The tiny ViewCrafter file (saved as viewcrafter_25_512) run as DynamiCrafter: the loader refuses by name."""
    result = server.run_example("reconx_viewcrafter",
                                overrides={"ReconXVideoModelLoader": {"backbone": "dynamicrafter_512_interp"}})
    assert result["rc"] == 1
    assert "ReconX Video Model Loader" in result["log"] and "saved as a ViewCrafter_25_512 model" in result["log"]


# ---- The README's bad-input table (Troubleshooting), replayed in the real server -------------------------------
# tests/test_bad_input.py holds each row to its message by calling the nodes directly; these submit the same inputs
# to ComfyUI as a user's queued graph and check what the table's columns claim: the message reaches the user
# (run_workflow.py prints the node error or the queue-time rejection), the server keeps serving, and no file is
# left in the output, temp or models folders.

def is_empty_prompt_cache(path: Path) -> bool:
    """The video loader saves the empty-prompt text features once, next to the models, when it loads a text tower
    (written whole, then renamed): a finished loader's deliberate file, never a partial one; it must read as one."""
    from reconx_core.model_files import classify_model_file

    return classify_model_file(path) == "empty_prompt"


def check_row(server, result, rc, pattern, files_before):
    """rc and message as the row says; the server still answers; no file left behind. A node that finished before
    the failing one (a preview of the point cloud, before a cancelled fit) has written its own complete result,
    which ComfyUI lists in the prompt's history: only files that no finished node reported count as left."""
    assert result["rc"] == rc, f"expected run_workflow rc {rc}, got {result['rc']}:\n{result['log'][-4000:]}"
    assert re.search(pattern, result["log"], re.S), f"{pattern!r} not in:\n{result['log'][-4000:]}"
    assert "Traceback" not in result["log"], result["log"][-4000:]      # a message, not a stack from torch
    assert server.get("/system_stats")["system"], "the server stopped answering"
    reported = json.dumps(result["history"].get("outputs", {}))
    left = sorted(f for f in server.files_under() - files_before
                  if Path(f).name not in reported and not is_empty_prompt_cache(Path(f)))
    assert not left, f"files left: {left}"
    assert files_before <= server.files_under(), "files were removed"


def geometry_row(server, label, overrides=None, edit=None, interrupt_at=None):
    """The geometry-only template (the cheapest graph that reaches every geometry node) with one bad input."""
    return server.run_example("reconx_geometry_only", overrides=overrides, edit=edit, label="_" + label,
                              interrupt_at=interrupt_at)


def align_inputs(prompt) -> dict:
    """The inputs of the API prompt's ReconX DUSt3R Global Alignment node."""
    return next(v["inputs"] for v in prompt.values() if v["class_type"] == "ReconXDust3rAlign")


def photo_inputs(prompt, slot) -> dict:
    """The inputs of the LoadImage node wired to the alignment's `slot` (images, image_2, ...)."""
    return prompt[align_inputs(prompt)[slot][0]]["inputs"]


def write_photo(server, name, size, mode="RGB"):
    from PIL import Image

    Image.new(mode, size, 128).save(server.input / name)
    return name


@needs_comfyui
def test_real_comfyui_one_photo(server):
    before = server.files_under()
    result = geometry_row(server, "one_photo", edit=lambda p: align_inputs(p).pop("image_2"))
    check_row(server, result, 1, r"ReconX DUSt3R Global Alignment needs at least 2 views, got 1", before)


@needs_comfyui
def test_real_comfyui_tiny_photo(server):
    name = write_photo(server, "one_pixel.png", (1, 1))
    before = server.files_under()
    result = geometry_row(server, "tiny_photo", edit=lambda p: photo_inputs(p, "image_2").update(image=name))
    check_row(server, result, 1, r"is 1x1 pixels; DUSt3R needs at least 64 px", before)


@needs_comfyui
def test_real_comfyui_greyscale_photos_run(server):
    grey = [write_photo(server, f"grey_{i}.png", (148 + 8 * i, 100), mode="L") for i in range(2)]
    before = server.files_under(server.models)
    result = geometry_row(server, "greyscale", edit=lambda p: (photo_inputs(p, "images").update(image=grey[0]),
                                                               photo_inputs(p, "image_2").update(image=grey[1])))
    assert result["rc"] == 0, result["log"][-4000:]
    assert server.files_under(server.models) == before


@needs_comfyui
def test_real_comfyui_two_photos_log_no_nan_loss(server):
    result = geometry_row(server, "two_photos")
    assert result["rc"] == 0, result["log"][-4000:]
    log = server.server_log()
    assert "aligned 2 views with DUSt3R's pair viewer" in log and "loss nan" not in log


def write_dust3r_file(server, kind: str) -> str:
    """A bad file in models/dust3r, as the table's rows describe."""
    import shutil

    from tests.bad_files import write_bad_checkpoint

    folder = server.models / "dust3r"
    if kind == "video":
        shutil.copy(server.models / "reconx" / server.names["video"], folder / "video_model.safetensors")
        return "video_model.safetensors"
    return write_bad_checkpoint(folder, kind, folder / server.names["dust3r"], marker=server.work / "payload_ran")


@needs_comfyui
@pytest.mark.parametrize("kind, pattern", [
    ("truncated.safetensors", r"cut\.safetensors is damaged \(truncated or corrupt\).*DUSt3R/MASt3R checkpoint again"),
    ("random", r"random\.pth is damaged \(truncated or corrupt\) or is not a checkpoint at all"),
    ("malicious", r"evil\.pth contains Python objects other than tensors \(posix\.system\)"),
    ("video", r"is a DynamiCrafter video-diffusion checkpoint.*ReconX Video Model Loader"),
], ids=["truncated", "random_bytes", "malicious_pickle", "video_model"])
def test_real_comfyui_bad_dust3r_file(server, kind, pattern):
    name = write_dust3r_file(server, kind)
    before = server.files_under()
    result = geometry_row(server, "file_" + kind.split(".")[0], overrides={"ReconXDust3rLoader": {"ckpt_name": name}})
    check_row(server, result, 1, pattern, before)
    assert not (server.work / "payload_ran").exists(), "the pickle's payload ran"
    if kind == "random":  # corrupt bytes are called corrupt, not a safety refusal
        assert "other than tensors" not in result["log"]


@needs_comfyui
def test_real_comfyui_missing_files_are_reported_when_queued(server):
    """A template opened without its files, and LPIPS on without AlexNet: refused at queue time (rc 2), nothing ran."""
    before = server.files_under()
    result = geometry_row(server, "no_files", overrides={
        "ReconXDust3rLoader": {"ckpt_name": "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth"},
        "ReconXFitGaussians": {"lpips_weight": 0.5}})
    check_row(server, result, 2, r"DUSt3R_ViTLarge_BaseDecoder_512_dpt\.pth' is not in models/dust3r", before)
    assert re.search(r"LPIPS needs the torchvision backbone alexnet-owt-7be5be79\.pth.*lpips_weight", result["log"])
    assert "executing node" not in result["log"]


@needs_comfyui
def test_real_comfyui_half_precision_on_the_cpu(server):
    before = server.files_under()
    result = geometry_row(server, "fp16", overrides={"ReconXDust3rLoader": {"precision": "fp16"}})
    check_row(server, result, 1, r"precision 'fp16' needs a CUDA GPU; choose 'fp32' or 'auto'", before)


def add_third_photo(prompt):
    """Three photos: the alignment optimises (two views take the pair viewer, which has no loop to cancel)."""
    new_id = str(max(int(k) for k in prompt) + 1)
    prompt[new_id] = {"class_type": "LoadImage", "inputs": {"image": "third.png"}}
    align_inputs(prompt)["image_3"] = [new_id, 0]


@needs_comfyui
@pytest.mark.parametrize("stage", ["ReconXDust3rAlign", "ReconXFitGaussians", "ReconXInterpolate"])
def test_real_comfyui_cancel(server, stage):
    """Cancel while a stage is in its loop: the run stops in that node, the server serves, no file is left."""
    before = server.files_under()
    long = {"ReconXDust3rAlign": {"iterations": 5000}, "ReconXFitGaussians": {"steps": 30000},
            "ReconXInterpolate": {"steps": 500}}
    if stage == "ReconXInterpolate":
        result = server.run_example("reconx_two_views", overrides={stage: long[stage]}, label="_cancel",
                                    interrupt_at=stage)
    else:
        result = geometry_row(server, f"cancel_{stage}", overrides={stage: long[stage]},
                              edit=add_third_photo if stage == "ReconXDust3rAlign" else None, interrupt_at=stage)
    check_row(server, result, 4, r"INTERRUPTED prompt \S+ at node", before)
    node_id = re.search(r"INTERRUPTED prompt \S+ at node (\S+)", result["log"]).group(1)
    assert result["prompt"][node_id]["class_type"] == stage, f"interrupted in node {node_id}, not in {stage}"
