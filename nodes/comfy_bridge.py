"""The one place the pack talks to ComfyUI.

Model folders (folder_paths), devices and offloading (comfy.model_management / ModelPatcher), the progress bar
and interrupt checks (comfy.utils) and native output types (comfy_api SPLAT / File3D) all go through here. No
ReconX node writes files: results leave as native types that ComfyUI's own save nodes write. Each has a plain fallback so that the node classes import and run without ComfyUI (CI calls
them directly); the fallbacks are noted where they differ.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("reconx")

try:  # inside ComfyUI
    import folder_paths  # type: ignore
    import comfy.model_management as model_management  # type: ignore
    import comfy.utils as comfy_utils  # type: ignore
    HAVE_COMFY = True
except ImportError:  # a script, a notebook, or CI
    folder_paths = model_management = comfy_utils = None
    HAVE_COMFY = False

MODEL_EXTENSIONS = {".safetensors", ".pth", ".ckpt", ".pt", ".bin"}
# Our model folders under ComfyUI's models/ (DESIGN.md): folder name -> what it holds.
MODEL_FOLDERS = {"dust3r": "DUSt3R / MASt3R checkpoints (files, or Hugging Face folders with config.json + "
                           "model.safetensors)",
                 "reconx": "DynamiCrafter-512-interp, structure branch, LPIPS backbones"}
# ComfyUI's own folders we read from (it registers them itself): clip_vision, text_encoders (and legacy clip).
COMFY_FOLDERS = ("clip_vision", "text_encoders")
# Where ComfyUI-DynamiCrafterWrapper keeps the pruned DynamiCrafter files; listed with models/reconx.
EXTRA_VIDEO_FOLDER = os.path.join("checkpoints", "dynamicrafter")

# Without ComfyUI, models live here (override with RECONX_MODELS_DIR).
_FALLBACK_MODELS_DIR = Path(os.environ.get("RECONX_MODELS_DIR", Path(__file__).resolve().parents[1] / "models"))


def register_model_folders() -> None:
    """Add models/dust3r and models/reconx (+ checkpoints/dynamicrafter) to ComfyUI's folder registry (idempotent)."""
    if not HAVE_COMFY:
        return
    for name in MODEL_FOLDERS:
        path = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, path)
        else:
            folder_paths.folder_names_and_paths[name] = ([path], set(MODEL_EXTENSIONS))
    folder_paths.add_model_folder_path("reconx", os.path.join(folder_paths.models_dir, EXTRA_VIDEO_FOLDER))


def model_folders(name: str) -> list[Path]:
    """The folders searched for models of kind `name` ("dust3r", "reconx", "clip_vision", "text_encoders")."""
    if HAVE_COMFY:
        register_model_folders()
        return [Path(p) for p in folder_paths.get_folder_paths(name)]
    return [_FALLBACK_MODELS_DIR / name]


def _present(name: str) -> list[str]:
    if HAVE_COMFY:
        register_model_folders()
        return list(folder_paths.get_filename_list(name))
    found = []
    for folder in model_folders(name):
        if folder.is_dir():
            found += [p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.suffix in MODEL_EXTENSIONS and not p.name.startswith(".")]
    return found


def _full_path(name: str, filename: str) -> Optional[Path]:
    if HAVE_COMFY:
        register_model_folders()
        full = folder_paths.get_full_path(name, filename)
        return Path(full) if full is not None else None
    for folder in model_folders(name):
        candidate = (folder / filename).resolve()
        if candidate.is_file() and folder.resolve() in candidate.parents:
            return candidate
    return None


def list_models(name: str, kinds: Optional[set] = None, downloads: bool = True) -> list[str]:
    """File names (relative to their folder) for a node's combo box.

    kinds: keep only files of these kinds (reconx_core.model_files.classify_model_file: the safetensors header,
    or the name of a pickle), so each list shows what its input can load. downloads: append the known files of
    those kinds that are absent, marked "⬇ name (size, licence, download)" (choosing one downloads it).
    """
    from reconx_core.model_files import classify_model_file

    present = sorted(_present(name))
    if kinds is None:
        return present
    kept = [f for f in present if classify_model_file(_full_path(name, f) or f) in kinds]
    if not downloads:
        return kept
    from reconx_core.downloads import absent_choices

    # A combo box starts on its first entry: never let that be a download nobody chose.
    return (kept or [NO_FILE]) + absent_choices(name, kinds, present)


NO_FILE = "(no file here yet: pick a ⬇ entry to download one)"


def _no_file_message(name: str) -> str:
    folders = ", ".join(str(f) for f in model_folders(name))
    return (f"no model file is chosen: put one in models/{name} ({folders}) and refresh, or pick an entry marked ⬇ "
            "to download it")


def is_download_choice(filename: str) -> bool:
    from reconx_core.downloads import parse_choice

    return parse_choice(filename) is not None


def model_path(name: str, filename: str) -> Path:
    """Absolute path of `filename` in the `name` model folders; a clear error when it is not there.

    A "⬇ name (...)" choice resolves to the file when it is present by now, else downloads it into the first
    folder of `name` with ComfyUI's progress bar (cancel stops it and leaves no partial file).
    """
    from reconx_core.downloads import download, parse_choice
    from reconx_core.errors import CheckpointError

    if filename == NO_FILE:
        raise CheckpointError(_no_file_message(name))
    known = parse_choice(filename)
    if known is not None:
        existing = next((p for p in (_full_path(name, f) for f in _present(name) if Path(f).name == known.name)
                         if p is not None), None)
        if existing is not None:
            return existing
        progress = Progress(1000)
        log.info("downloading %s into %s", known.name, model_folders(name)[0])
        return download(known, model_folders(name)[0], progress.phase(1000))
    full = _full_path(name, filename)
    if full is not None:
        return full
    folders = ", ".join(str(f) for f in model_folders(name))
    raise CheckpointError(f"model file '{filename}' not found in models/{name} ({folders}); put it there and refresh")


def validate_choice(name: str, filename: str):
    """For a node's VALIDATE_INPUTS: True for a present file or a known download (also one chosen earlier whose
    file is present by now, which the refreshed list no longer shows), else the reason."""
    if filename == NO_FILE:
        return _no_file_message(name)
    if is_download_choice(filename) or _full_path(name, filename) is not None:
        return True
    return f"'{filename}' is not in models/{name}; put it there and refresh, or pick another file"


# ----------------------------------------------------------------------------------------------- devices
def compute_device() -> torch.device:
    """The device our stages run on: ComfyUI's torch device, else CUDA when present, else the CPU."""
    if HAVE_COMFY:
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    if HAVE_COMFY:
        return model_management.unet_offload_device()
    return torch.device("cpu")


def resolve_device(choice: str) -> torch.device:
    """Map a node's device widget ("auto", "cpu", "cuda") to a torch device."""
    from reconx_core.errors import InputError

    if choice == "auto":
        return compute_device()
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was chosen but no CUDA GPU is available; choose 'auto' or 'cpu'")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """Map a precision widget ("auto", "fp32", "fp16", "bf16") to a dtype; half precision only on CUDA."""
    from reconx_core.errors import InputError

    if choice == "fp32":
        return torch.float32
    if choice in ("fp16", "bf16"):
        if device.type != "cuda":
            raise InputError(f"precision '{choice}' needs a CUDA GPU; choose 'fp32' or 'auto' on {device.type}")
        return torch.float16 if choice == "fp16" else torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class ManagedModel:
    """A network ComfyUI can offload when other models need the GPU.

    Plain networks (DUSt3R) are wrapped in a ModelPatcher: `acquire()` asks model management to load them on the
    compute device, unloading other models if needed, and ComfyUI offloads them when it needs the room.
    Networks that place themselves stage by stage (the video model's `place`/`stage`: UNet, VAE and CLIP towers
    take turns on the GPU) are not patched; `acquire()` first asks ComfyUI to free their size on the device and
    `release()` sends them back to the offload device. Without ComfyUI both just move the module.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype, name: str = "model",
                 staged_offload: bool = False):
        self.module = module
        self.device = torch.device(device)
        self.dtype = dtype
        self.name = name
        self.self_placing = hasattr(module, "place")
        self.staged_offload = staged_offload
        self.patcher = None
        if HAVE_COMFY and not self.self_placing:
            import comfy.model_patcher  # type: ignore

            self.patcher = comfy.model_patcher.ModelPatcher(module, load_device=self.device,
                                                             offload_device=offload_device())

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.module.state_dict().values())

    def acquire(self) -> torch.nn.Module:
        if self.patcher is not None:
            model_management.load_models_gpu([self.patcher])
        elif self.self_placing:
            if HAVE_COMFY and self.device.type != "cpu":
                # With staged offload only the largest network is on the GPU at a time; free room for it.
                need = self.size_bytes() // (3 if self.staged_offload else 1)
                model_management.free_memory(need, self.device)
            self.module.place(self.device, offload=self.staged_offload, offload_device=offload_device())
        else:
            self.module.to(self.device)
        return self.module

    def release(self) -> None:
        """Hand the GPU memory back after a node ran (self-placing models; ComfyUI manages patched ones)."""
        if self.self_placing and self.device.type != "cpu":
            self.module.place(offload_device())
            if HAVE_COMFY:
                model_management.soft_empty_cache()

    def __repr__(self) -> str:
        return f"ManagedModel({self.name}, device={self.device}, dtype={self.dtype})"


# ----------------------------------------------------------------------------------------------- progress
class Interrupted(Exception):
    """Raised by the fallback progress hook when `request_interrupt` was called (tests use it)."""


_interrupt_requested = False


def request_interrupt(flag: bool = True) -> None:
    """Fallback interrupt switch for scripts and tests (ComfyUI uses its own)."""
    global _interrupt_requested
    _interrupt_requested = flag


def check_interrupt() -> None:
    if HAVE_COMFY:
        model_management.throw_exception_if_processing_interrupted()
    elif _interrupt_requested:
        raise Interrupted("interrupted by the user")


class Progress:
    """A progress bar over several phases: `phase(weight)` returns a callback(done, total) for one loop.

    Every reconx_core loop calls its callback with done = 1 .. total after each step. The callback advances
    ComfyUI's ProgressBar and raises when the user pressed cancel, so a long loop stops within one step.
    """

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.done = 0
        self.bar = comfy_utils.ProgressBar(self.total) if HAVE_COMFY else None

    def phase(self, weight: int) -> Callable[[int, int], None]:
        start = self.done
        self.done += weight

        def callback(done: int, total: int) -> None:
            check_interrupt()
            if self.bar is not None:
                self.bar.update_absolute(start + int(weight * min(done, total) / max(total, 1)), self.total)

        return callback


# ----------------------------------------------------------------------------------------------- native types
@dataclass
class _FallbackSplat:
    """Same fields as comfy_api's Types.SPLAT, used when ComfyUI is absent."""

    positions: torch.Tensor
    scales: torch.Tensor
    rotations: torch.Tensor
    opacities: torch.Tensor
    sh: torch.Tensor
    counts: Optional[torch.Tensor] = None


class _FallbackFile3D:
    """Same interface as comfy_api's Types.File3D for an in-memory file."""

    def __init__(self, source, file_format: str = ""):
        self._source = source
        self.format = file_format

    def get_bytes(self) -> bytes:
        if isinstance(self._source, (str, Path)):
            return Path(self._source).read_bytes()
        return self._source.getvalue()

    def save_to(self, path: str) -> str:
        Path(path).write_bytes(self.get_bytes())
        return path


def _comfy_types():
    try:
        from comfy_api.latest import Types  # type: ignore
        return Types
    except ImportError:
        return None


def make_splat(positions, scales, rotations, opacities, sh):
    """ComfyUI's native SPLAT: positions (B,N,3), linear scales (B,N,3), wxyz rotations (B,N,4),
    opacities (B,N,1) in [0,1], sh (B,N,K,3)."""
    types = _comfy_types()
    cls = types.SPLAT if types is not None and hasattr(types, "SPLAT") else _FallbackSplat
    return cls(positions=positions, scales=scales, rotations=rotations, opacities=opacities, sh=sh)


def make_file3d(data: bytes, file_format: str = "ply"):
    """ComfyUI's native File3D around in-memory bytes (FILE_3D_PLY when file_format is 'ply')."""
    types = _comfy_types()
    if types is not None and hasattr(types, "File3D"):
        return types.File3D(io.BytesIO(data), file_format)
    return _FallbackFile3D(io.BytesIO(data), file_format)


def file3d_bytes(file3d) -> bytes:
    """The bytes of a File3D, native or fallback."""
    if hasattr(file3d, "get_bytes"):
        return file3d.get_bytes()
    source = getattr(file3d, "_source", None)
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    return source.getvalue()
