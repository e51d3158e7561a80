"""The example workflows: every node type exists (ours or a known ComfyUI core node), every link joins matching
types, every widget value is valid, each has a thumbnail, and the files are what the builder script writes."""

import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from build_example_workflows import build_all  # noqa: E402
from comfy_workflows import check_ui, node_specs, ui_to_api  # noqa: E402

EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))


def test_there_are_examples():
    assert {p.stem for p in EXAMPLES} >= {"reconx_geometry_only"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_valid(path):
    workflow = json.loads(path.read_text())
    assert check_ui(workflow, node_specs()) == []
    assert path.with_suffix(".jpg").is_file(), f"{path.stem}.jpg (the Templates thumbnail) is missing"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_up_to_date(path):
    assert json.loads(path.read_text()) == build_all()[path.stem], \
        "example workflow differs from scripts/build_example_workflows.py: run it and commit the result"


def test_checker_finds_broken_workflows():
    specs = node_specs()
    good = build_all()["reconx_geometry_only"]
    align = next(n for n in good["nodes"] if n["type"] == "ReconXDust3rAlign")

    bad = copy.deepcopy(good)
    bad["links"][0][5] = "MASK"  # a link whose type is not its source's
    assert any("link 1" in p for p in check_ui(bad, specs))

    bad = copy.deepcopy(good)
    next(n for n in bad["nodes"] if n["id"] == align["id"])["widgets_values"][1] = 999999  # iterations > max
    assert any("iterations" in p for p in check_ui(bad, specs))

    bad = copy.deepcopy(good)
    next(n for n in bad["nodes"] if n["id"] == align["id"])["widgets_values"][0] = "everything"  # not a graph
    assert any("scene_graph" in p for p in check_ui(bad, specs))

    bad = copy.deepcopy(good)
    bad["nodes"][0]["type"] = "NoSuchNode"
    assert any("unknown type" in p for p in check_ui(bad, specs))

    bad = copy.deepcopy(good)
    for node in bad["nodes"]:
        if node["id"] == align["id"]:
            node["inputs"][1]["link"] = None  # the model input left unconnected
    assert any("dust3r is not connected" in p for p in check_ui(bad, specs))


def test_api_form_links_and_widgets():
    prompt = ui_to_api(build_all()["reconx_geometry_only"], node_specs())
    align = next(v for v in prompt.values() if v["class_type"] == "ReconXDust3rAlign")
    assert align["inputs"]["iterations"] == 300 and align["inputs"]["scene_graph"] == "complete"
    src, slot = align["inputs"]["dust3r"]
    assert prompt[src]["class_type"] == "ReconXDust3rLoader" and slot == 0
    # each photo on its own input (any sizes), not through Batch Images (which crops to the first one's size)
    photos = [align["inputs"][name] for name in ("images", "image_2")]
    assert [prompt[src]["class_type"] for src, _ in photos] == ["LoadImage", "LoadImage"]


def test_every_node_has_a_stage_colour():
    """web/js/reconx.js colours each node by its stage; a node added without a colour reads as foreign in a graph."""
    import re

    from nodes import NODE_CLASS_MAPPINGS

    script = (REPO / "web" / "js" / "reconx.js").read_text()
    table = script[script.index("STAGE_COLOURS"):script.index("};")]
    coloured = set(re.findall(r"(ReconX\w+):", table))
    registered = set(NODE_CLASS_MAPPINGS)
    assert coloured == registered, \
        f"missing colours: {sorted(registered - coloured)}, stale: {sorted(coloured - registered)}"
