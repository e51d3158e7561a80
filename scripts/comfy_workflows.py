"""Example workflows: build them from a compact description, check them, and convert them to API form.

The UI format written here is what ComfyUI's frontend (1.49, LiteGraph version 0.4) serialises; the widget
order rules (an upload value after LoadImage's file, a control value after seeds, LOAD_3D viewport widgets)
were read off the real frontend. Node input specs come from our node classes and, for core nodes, from
tests/data/comfy_core_nodes.json (a snapshot of a real server's /api/object_info).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "LOAD_3D"}
# Frontend-only nodes (no backend class); ignored by the checks and the API form.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
# LiteGraph node modes: 0 always, 2 never (muted), 4 bypass.
ACTIVE, MUTED, BYPASSED = 0, 2, 4
FILE_PICKERS = {"ckpt_name", "image", "model_name", "structure_name", "lpips_name"}


def node_specs() -> dict:
    """{class_type: {"input": {...}, "output": [...], "output_name": [...]}} for our nodes and the core snapshot."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from nodes import NODE_CLASS_MAPPINGS

    specs = json.loads((REPO / "tests" / "data" / "comfy_core_nodes.json").read_text())["nodes"]
    for name, cls in NODE_CLASS_MAPPINGS.items():
        specs[name] = {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES),
                       "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)), "ours": True}
    return specs


def _inputs(spec: dict):
    """(name, type, options) of every declared input, required first, in declaration order."""
    for section in ("required", "optional"):
        for name, decl in spec["input"].get(section, {}).items():
            kind, opts = decl[0], (decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {})
            yield name, kind, opts


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _type_name(kind) -> str:
    return "COMBO" if isinstance(kind, list) else kind


def widget_names(spec: dict) -> list:
    """Names of the values in a node's widgets_values, in order (None marks a frontend-only value)."""
    names = []
    for name, kind, opts in _inputs(spec):
        if not _is_widget(kind):
            continue
        names.append(name)
        if opts.get("image_upload"):
            names.append(None)  # the "upload" button's value
        if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
            names.append(None)  # "fixed" / "randomize"
    return names


def build_ui(nodes: list, links: list, specs: dict) -> dict:
    """A UI-format workflow.

    nodes: [{"id", "type", "pos": [x, y], "widgets": {name: value}, "title"?: str, "link_inputs"?: [names]}]
           (link_inputs names dynamic inputs such as BatchImagesNode's "images.image0").
    links: [(from_id, from_slot, to_id, to_input_name)].
    """
    out_nodes, out_links = [], []
    by_id = {n["id"]: n for n in nodes}
    inputs_of, outputs_of = {}, {}
    for n in nodes:
        if n["type"] in FRONTEND_ONLY:
            out_nodes.append({"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n.get("size", [400, 160]),
                              "flags": {}, "order": len(out_nodes), "mode": ACTIVE, "inputs": [], "outputs": [],
                              "properties": {}, "widgets_values": [n["text"]],
                              "color": "#432", "bgcolor": "#653"})
            inputs_of[n["id"]], outputs_of[n["id"]] = [], []
            continue
        spec = specs[n["type"]]
        ins = []
        for name in n.get("link_inputs", []):
            ins.append({"name": name, "type": "IMAGE", "link": None})
        for name, kind, opts in _inputs(spec):
            if kind == "COMFY_AUTOGROW_V3":
                continue
            entry = {"name": name, "type": _type_name(kind), "link": None}
            if _is_widget(kind):
                entry["widget"] = {"name": name}
            elif "optional" in spec["input"] and name in spec["input"]["optional"]:
                entry["shape"] = 7
            ins.append(entry)
        outs = [{"name": (spec.get("output_name") or spec["output"])[i], "type": t, "links": [], "slot_index": i}
                for i, t in enumerate(spec["output"])]
        values, given = [], dict(n.get("widgets", {}))
        for wname in widget_names(spec):
            if wname is None:
                values.append("image" if n["type"] == "LoadImage" else "fixed")
                continue
            decl = dict((nm, (k, o)) for nm, k, o in _inputs(spec))[wname]
            choices = decl[0] if isinstance(decl[0], list) else decl[1].get("options", [])
            default = decl[1].get("default", choices[0] if choices else "")
            values.append(given.pop(wname, default))
        if given:
            raise ValueError(f"node {n['id']} ({n['type']}) has no widgets {sorted(given)}")
        inputs_of[n["id"]], outputs_of[n["id"]] = ins, outs
        node = {"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n.get("size", [300, 120]), "flags": {},
                "order": len(out_nodes), "mode": n.get("mode", ACTIVE), "inputs": ins, "outputs": outs,
                "properties": {"Node name for S&R": n["type"]}, "widgets_values": values}
        if "title" in n:
            node["title"] = n["title"]
        out_nodes.append(node)
    for link_id, (src, slot, dst, name) in enumerate(links, start=1):
        target = next((i for i in inputs_of[dst] if i["name"] == name), None)
        if target is None:
            raise ValueError(f"node {dst} ({by_id[dst]['type']}) has no input {name}")
        kind = outputs_of[src][slot]["type"]
        target["link"] = link_id
        outputs_of[src][slot]["links"].append(link_id)
        out_links.append([link_id, src, slot, dst, inputs_of[dst].index(target), kind])
    return {"last_node_id": max(by_id), "last_link_id": len(out_links), "nodes": out_nodes, "links": out_links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def check_ui(workflow: dict, specs: dict) -> list:
    """Problems in a UI-format workflow: unknown node types, links joining mismatched types, invalid widgets."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in workflow["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        spec = specs.get(n["type"])
        if spec is None:
            problems.append(f"node {n['id']}: unknown type {n['type']}")
            continue
        names = widget_names(spec)
        values = n.get("widgets_values") or []
        if len(values) != len(names):
            problems.append(f"node {n['id']} ({n['type']}): {len(values)} widget values, expected {len(names)}")
            continue
        decls = {nm: (k, o) for nm, k, o in _inputs(spec)}
        for name, value in zip(names, values):
            if name is None:
                continue
            kind, opts = decls[name]
            if isinstance(kind, list):
                # File pickers (model files, input images) list what this machine has; any name passes here
                # and a real run checks the folder.
                if name not in FILE_PICKERS and value not in kind:
                    problems.append(f"node {n['id']} ({n['type']}).{name}: {value!r} not in {kind}")
            elif kind in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"node {n['id']} ({n['type']}).{name}: {value!r} is not a number")
                elif ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                    problems.append(f"node {n['id']} ({n['type']}).{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
                elif kind == "INT" and int(value) != value:
                    problems.append(f"node {n['id']} ({n['type']}).{name}: {value} is not an integer")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"node {n['id']} ({n['type']}).{name}: {value!r} is not a boolean")
            elif kind == "COMBO" and opts.get("options") and value not in opts["options"]:
                problems.append(f"node {n['id']} ({n['type']}).{name}: {value!r} not in {opts['options']}")
    for link_id, src, slot, dst, dst_slot, kind in workflow["links"]:
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: joins a missing node")
            continue
        src_spec, dst_node = specs.get(nodes[src]["type"]), nodes[dst]
        if src_spec is None:
            continue
        out_kind = src_spec["output"][slot]
        in_kind = dst_node["inputs"][dst_slot]["type"]
        dst_spec = specs.get(dst_node["type"])
        declared = {nm: _type_name(k) for nm, k, _ in _inputs(dst_spec)} if dst_spec else {}
        in_name = dst_node["inputs"][dst_slot]["name"]
        if in_name in declared and declared[in_name] != in_kind:
            problems.append(f"link {link_id}: input {in_name} says {in_kind}, the node declares {declared[in_name]}")
        if kind != out_kind or (out_kind not in in_kind.split(",") and in_kind != "*"):
            problems.append(f"link {link_id}: {nodes[src]['type']} output {slot} ({out_kind}) -> "
                            f"{dst_node['type']}.{in_name} ({in_kind})")
    links = {link[0]: link for link in workflow["links"]}
    for n in workflow["nodes"]:
        spec = specs.get(n["type"])
        if spec is None or n.get("mode", ACTIVE) != ACTIVE:
            continue
        # inputs fed by muted/bypassed nodes count as unconnected (ComfyUI drops those links)
        linked = {i["name"] for i in n["inputs"] if i.get("link") is not None
                  and nodes[links[i["link"]][1]].get("mode", ACTIVE) == ACTIVE}
        for name, kind, _ in _inputs(spec):
            required = name in spec["input"].get("required", {})
            if required and not _is_widget(kind) and kind != "COMFY_AUTOGROW_V3" and name not in linked:
                problems.append(f"node {n['id']} ({n['type']}): required input {name} is not connected")
    return problems


def _resolve_source(link_id, links: dict, nodes: dict, modes: dict):
    """(node id, output slot) feeding a link, following bypassed nodes as ComfyUI does (a bypassed node passes its
    first input of the output's type through); None when the link is absent or ends at a muted node."""
    while link_id is not None:
        _, src, slot, _, _, kind = links[link_id]
        if modes[src] == ACTIVE:
            return src, slot
        if modes[src] != BYPASSED:
            return None
        link_id = next((i.get("link") for i in nodes[src]["inputs"] if i["type"] == kind and i.get("link")), None)
    return None


def ui_to_api(workflow: dict, specs: dict) -> dict:
    """The API form (what /prompt takes) of a UI-format workflow, as the frontend's graphToPrompt builds it."""
    links = {link[0]: link for link in workflow["links"]}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    modes = {n["id"]: n.get("mode", ACTIVE) for n in workflow["nodes"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n["type"] in FRONTEND_ONLY or modes[n["id"]] != ACTIVE:
            continue
        inputs = {}
        for name, value in zip(widget_names(specs[n["type"]]), n.get("widgets_values") or []):
            if name is not None:
                inputs[name] = value
        for entry in n["inputs"]:
            source = _resolve_source(entry.get("link"), links, nodes, modes)
            if source is not None:
                inputs[entry["name"]] = [str(source[0]), source[1]]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                                "_meta": {"title": n.get("title", n["type"])}}
    return prompt
