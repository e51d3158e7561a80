"""Evaluation indices: which frames of each scene are the context views and which are the targets.

MVSplat's files (assets/evaluation_index_re10k.json, evaluation_index_acid.json in donydchen/mvsplat, the same
as pixelSplat's) map each test scene key to {"context": [i, j], "target": [a, b, c]} (frame indices into the
scene's clip) or to null for scenes the protocol leaves out:

    {"5aca87f95a9412c6": {"context": [58, 133], "target": [84, 102, 129]}, "e74ceac9043aa1b8": null, ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..errors import InputError


@dataclass(frozen=True)
class EvaluationEntry:
    """One scene's views: context (frame indices given to the method) and target (frames it must render)."""

    context: tuple
    target: tuple


def parse_evaluation_index(raw: dict, source: str = "index") -> dict:
    """A decoded index -> {key: EvaluationEntry or None}, validated."""
    if not isinstance(raw, dict):
        raise InputError(f"{source} must map scene keys to {{'context': [...], 'target': [...]}} or null")
    out = {}
    for key, value in raw.items():
        if value is None:
            out[str(key)] = None
            continue
        if not isinstance(value, dict) or "context" not in value or "target" not in value:
            raise InputError(f"{source}: scene {key} must have 'context' and 'target' lists (or be null)")
        context, target = value["context"], value["target"]
        if not all(isinstance(v, list) and v and all(isinstance(i, int) for i in v) for v in (context, target)):
            raise InputError(f"{source}: scene {key} needs non-empty integer lists, got {value}")
        out[str(key)] = EvaluationEntry(tuple(context), tuple(target))
    return out


def load_evaluation_index(path: Union[str, Path]) -> dict:
    """Read an evaluation index file -> {key: EvaluationEntry or None}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"evaluation index {path} does not exist; the benchmarks' files are "
                         "assets/evaluation_index_re10k.json and evaluation_index_acid.json in "
                         "https://github.com/donydchen/mvsplat")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"evaluation index {path} is not valid JSON ({exc})") from None
    return parse_evaluation_index(raw, str(path))


def write_evaluation_index(path: Union[str, Path], entries: dict) -> None:
    """Write {key: EvaluationEntry or None} in MVSplat's format."""
    raw: dict = {}
    for key, entry in entries.items():
        raw[key] = None if entry is None else {"context": list(entry.context), "target": list(entry.target)}
    Path(path).write_text(json.dumps(raw))


def selected_scenes(index: dict, available) -> tuple:
    """(keys to evaluate in the dataset's order, keys the index names that the dataset lacks).

    index: {key: EvaluationEntry or None}; available: the dataset's keys in its order (chunk order).
    Null entries are left out, as MVSplat's evaluation sampler skips them.
    """
    wanted = {k for k, v in index.items() if v is not None}
    present = [k for k in available if k in wanted]
    missing = sorted(wanted - set(present))
    return present, missing

