"""Every example workflow, submitted to a real ComfyUI server with this pack and tiny random-weight models.

Skipped unless COMFYUI_DIR points to a ComfyUI source tree with its venv beside it (../venv, or COMFYUI_VENV).
The scripts that start the server come from RECONX_COMFY_TOOLS (shared/tools/comfyui), found by themselves when
this repository sits beside ../shared or RECONX_FIXTURES points at shared/fixtures; with COMFYUI_DIR set and no
tools found the tests fail naming RECONX_COMFY_TOOLS. Set-up: shared/tools/comfyui/README.md.
By hand: `COMFYUI_DIR=... RECONX_COMFY_TOOLS=... .venv/bin/python tests/comfyui_harness.py`.
"""

import json
import os
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
