"""Bad checkpoint files as users meet them, written the same way for the node tests (tests/test_bad_input.py), the
loader tests (tests/test_dust3r_files.py) and the real-ComfyUI replay (tests/test_comfyui_integration.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file


class RunsACommand:
    """Pickles as a call to os.system touching `marker`; weights-only loading must refuse it without calling it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_bad_checkpoint(folder: Path, kind: str, good: Path, marker: Optional[Path] = None) -> str:
    """Write one bad file next to the good `.safetensors` checkpoint `good`; returns its name in `folder`.

    kind: "truncated.safetensors" / "truncated.pth" (the first half of a whole file, as an interrupted download
    leaves it), "random" (8 KiB of seeded random bytes as a .pth), "malicious" (a .pth holding the weights and a
    RunsACommand(marker) pickle).
    """
    state = load_file(str(good))
    if kind.startswith("truncated"):
        suffix = Path(kind).suffix
        whole = folder / f"whole{suffix}"
        save_file(state, str(whole)) if suffix == ".safetensors" else torch.save({"model": state}, whole)
        data = whole.read_bytes()
        whole.unlink()
        name = f"cut{suffix}"
        (folder / name).write_bytes(data[: len(data) // 2])
    elif kind == "random":
        name = "random.pth"
        noise = torch.randint(0, 256, (8192,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        (folder / name).write_bytes(noise.numpy().tobytes())
    elif kind == "malicious":
        if marker is None:
            raise ValueError("a malicious file needs the marker path its payload would create")
        name = "evil.pth"
        torch.save({"model": state, "extra": RunsACommand(marker)}, folder / name)
    else:
        raise ValueError(f"unknown bad-file kind {kind!r}")
    return name
