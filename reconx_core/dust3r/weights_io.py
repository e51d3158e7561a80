"""Reading model files safely, and telling a damaged file from an unsafe one and one model from another.

Shared by the DUSt3R/MASt3R loader (checkpoint.py) and the DynamiCrafter loader (reconx_core/video/checkpoint.py).

- `.safetensors`: read with safetensors (header only when `meta=True`).
- `.pth` / `.ckpt` / `.pt` / `.bin`: `torch.load(weights_only=True)` only. When that fails, the file is examined
  without running anything (magic bytes, the zip directory, and the pickle opcodes listed by `pickletools`, which
  never imports or calls anything) to say which of two very different things happened:
    * the file is damaged or is not a checkpoint at all (empty, cut off, random bytes, an HTML error page, a Git LFS
      pointer, a pickle of something else): the message says so and suggests downloading it again;
    * the file is an intact pickle that asks for Python objects other than tensors (a class or function such as
      `posix.system`, `numpy...scalar`): it is refused for safety and the message names what it asks for.
- `identify_model(keys)` names the model family a state dict belongs to (DUSt3R, MASt3R, DynamiCrafter, ...), so a
  file given to the wrong loader gets "this is a DynamiCrafter checkpoint; use it in ... and pick ... here".
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
ZIP_MAGIC = b"PK\x03\x04"
# Globals a plain torch.save of tensors and dicts references; anything else is an object the weights-only loader
# refuses (and a pickle of it could run code when loaded the unsafe way).
_PLAIN_GLOBALS = {"collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray",
                  "builtins.slice", "builtins.complex", "_codecs.encode"}

# --------------------------------------------------------------------------------------- model families by keys
DUST3R_FILES = ("DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (recommended), DUSt3R_ViTLarge_BaseDecoder_512_linear.pth, "
                "DUSt3R_ViTLarge_BaseDecoder_224_linear.pth, MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth, "
                "or a Hugging Face folder (config.json + model.safetensors) of one of them")
DYNAMICRAFTER_FILES = ("dynamicrafter_512_interp_fp16_pruned.safetensors (with a CLIP ViT-H clip_vision file) or "
                       "dynamicrafter_512_interp.ckpt (DynamiCrafter_512_Interp's model.ckpt)")
_FAMILIES = {
    "DUSt3R": ("a DUSt3R point-map network", "ReconX DUSt3R Loader (models/dust3r)"),
    "MASt3R": ("a MASt3R point-map and descriptor network", "ReconX DUSt3R Loader (models/dust3r)"),
    "CroCo": ("a CroCo pre-training checkpoint, an encoder/decoder without DUSt3R's point-map heads", None),
    "DUNE-MASt3R": ("a DUNE+MASt3R checkpoint, whose DUNE encoder ReconX does not support", None),
    "DynamiCrafter": ("a DynamiCrafter video-diffusion checkpoint", "ReconX Video Model Loader (models/reconx)"),
    "ReconX structure branch": ("a ReconX structure-branch file", "the structure_name input of ReconX Video Model "
                                                                  "Loader"),
    "Stable Diffusion": ("a Stable Diffusion-style image checkpoint without DynamiCrafter's video layers", None),
    "VAE": ("an image autoencoder", None),
}


def _unwrap(obj):
    """The state dict inside the usual wrappers: {'model': sd}, {'state_dict': sd}, {'module': sd}."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def identify_model(keys: Iterable[str]) -> Optional[Tuple[str, str]]:
    """(family, evidence) for a set of state-dict keys, or None when no known family matches.

    family is one of DUSt3R, MASt3R, CroCo, DUNE-MASt3R, DynamiCrafter, ReconX structure branch, Stable Diffusion,
    VAE; evidence is a short "found ..." phrase naming keys that decided it.
    """
    keys = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    keyset = set(keys)

    def some(prefix: str) -> Optional[str]:
        return next((k for k in keys if k.startswith(prefix)), None)

    if some("dune_backbone.") or (some("mast3r.") and some("mast3r.downstream_head1.")):
        return "DUNE-MASt3R", f"found {some('dune_backbone.') or some('mast3r.')}"
    backbone = "patch_embed.proj.weight" in keyset and some("enc_blocks.") and some("dec_blocks.")
    if backbone and some("downstream_head1.head_local_features."):
        return "MASt3R", f"found {some('downstream_head1.head_local_features.')}"
    if backbone and some("downstream_head1."):
        return "DUSt3R", f"found patch_embed.proj.weight, enc_blocks.*, {some('downstream_head1.')}"
    if backbone and some("prediction_head."):
        return "CroCo", f"found enc_blocks.*, dec_blocks.*, {some('prediction_head.')} and no downstream_head1.*"
    diffusion = some("model.diffusion_model.")
    # DynamiCrafter's UNet spells its temporal convolutions "temopral_conv"; the image branch adds these prefixes
    video = some("image_proj_model.") or some("embedder.") or next((k for k in keys if "temopral_conv" in k), None)
    if diffusion and video:
        return "DynamiCrafter", f"found {diffusion} and {video}"
    if diffusion:
        return "Stable Diffusion", f"found {diffusion}"
    branch = some("structure_encoder.") or next((k for k in keys if "_struct" in k), None)
    if branch:
        return "ReconX structure branch", f"found {branch}"
    if some("encoder.conv_in.") and some("decoder.conv_out."):
        return "VAE", "found encoder.conv_in.* and decoder.conv_out.*"
    return None


def wrong_model_message(name: str, found: Tuple[str, str], expected: str, pick: str) -> str:
    """'X is <family> (<evidence>); it is not <expected>. Load it with <loader>. Here pick <pick>'."""
    family, evidence = found
    what, where = _FAMILIES.get(family, (family, None))
    use = f" Load it with {where}." if where else ""
    return f"{name} is {what} ({evidence}); it is not {expected}.{use} Here pick {pick}"


def check_model_family(keys: Iterable[str], name: str, expected: Sequence[str], expected_text: str,
                       pick: str) -> None:
    """Raise CheckpointError when the keys identify a known family that is not one of `expected`."""
    found = identify_model(keys)
    if found is not None and found[0] not in expected:
        raise CheckpointError(wrong_model_message(name, found, expected_text, pick))


# ------------------------------------------------------------------------------------------------ reading
def read_weights(path: Union[str, os.PathLike], *, what: str, download: str, meta: bool = False,
                 mmap: bool = False, safe_globals: Sequence = ()) -> Tuple[object, Dict[str, str]]:
    """Read a model file -> (object, safetensors metadata).

    path: a .safetensors file, or a .pth/.pt/.ckpt/.bin file written by torch.save.
    what: what the file should be, for messages ("DUSt3R checkpoint"); download: where to get it again
        ("https://..." or a model page), for messages.
    meta: .safetensors header only (meta tensors with the right shapes/dtypes); pickles are mapped to "meta".
    mmap: map a zip-format torch file instead of reading it (less memory for multi-GB checkpoints).
    safe_globals: extra classes the weights-only unpickler may build (e.g. argparse.Namespace for DUSt3R's args).
    For .safetensors the object is a dict of tensors; for pickles it is whatever the file holds (often a dict
    with the state dict inside). Raises CheckpointError: missing file, damaged file (says "download it again"),
    or a pickle that asks for Python objects other than tensors (names them; never loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}. Put the file there or pass the correct path "
                              f"(download: {download})")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path, what, download, meta)
    head = _head(path)
    if _looks_like_safetensors(head):
        # a safetensors file saved under another extension (e.g. renamed to .pth) reads as what it is
        try:
            return _read_safetensors(path, what, download, meta)
        except CheckpointError:
            pass
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = torch.load(str(path), map_location="meta" if meta else "cpu", weights_only=True,
                             mmap=bool(mmap and not meta and head.startswith(ZIP_MAGIC)))
    except Exception as err:  # every failure is classified below; nothing in the file is run
        raise CheckpointError(_explain_load_failure(path, err, what, download)) from None
    return obj, {}


def _read_safetensors(path: Path, what: str, download: str, meta: bool):
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            if meta:
                sd = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    sd[k] = torch.empty(sl.get_shape(), dtype=_st_dtype(sl.get_dtype()), device="meta")
            else:
                sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        size = path.stat().st_size
        reason = "it is empty (0 bytes)" if size == 0 else f"{type(err).__name__}: {str(err)[:160]}"
        pointer = _special_text(_head(path))
        raise CheckpointError(
            f"{path.name} is damaged (truncated or corrupt) or is not a .safetensors file: "
            f"{pointer or reason}. Download the {what} again ({download})") from None
    return sd, metadata


def _st_dtype(name: str) -> torch.dtype:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return table.get(name, torch.float32)


def _head(path: Path, n: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object
    return len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _special_text(head: bytes) -> Optional[str]:
    """A short description of files that are text, not weights (failed downloads), or None."""
    if head.startswith(b"version https://git-lfs.github.com/spec"):
        return "it is a Git LFS pointer (a small text file naming the real weights), not the weights themselves"
    low = head[:512].lower().lstrip()
    if low.startswith((b"<!doctype html", b"<html", b"<?xml")) or b"<html" in low:
        return "it is a web page (HTML), not weights: the download saved an error or login page"
    return None


def _explain_load_failure(path: Path, err: Exception, what: str, download: str) -> str:
    name = path.name
    damaged = (f"{name} is damaged (truncated or corrupt) or is not a checkpoint at all: {{}}. Download the {what} "
               f"again ({download})")
    size = path.stat().st_size
    if size == 0:
        return damaged.format("it is empty (0 bytes)")
    head = _head(path)
    special = _special_text(head)
    if special:
        return damaged.format(special)
    torch_reason = " ".join(str(err).split())[:160]
    if head.startswith(ZIP_MAGIC):
        pickled, reason = _zip_pickle(path)
        if pickled is None:
            return damaged.format(reason)
        streams = [pickled]
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        with open(path, "rb") as f:
            data = f.read(min(size, 64 << 20))  # the pickled structure sits at the start; tensor bytes follow
        streams = [data]
    else:
        return damaged.format(f"its first bytes ({head[:8].hex(' ')}) are neither a zip archive nor a pickle, "
                              "so it was not written by torch.save")
    globals_, problem = _pickle_globals(streams[0])
    if problem is not None:
        return damaged.format(f"its pickled structure is cut off or garbled ({problem})")
    unsafe = sorted(g for g in globals_ if not _plain_global(g))
    if unsafe:
        return (f"{name} contains Python objects other than tensors ({', '.join(unsafe[:5])}"
                f"{', ...' if len(unsafe) > 5 else ''}). Loading those could run code, so only weights-only files "
                f"are read and this one is refused. Use the official {what} ({download}), or convert this file to "
                ".safetensors with a script you trust")
    if isinstance(err, pickle.UnpicklingError) and not globals_:
        return damaged.format("it is a Python pickle of plain values, not a torch.save checkpoint")
    return damaged.format(f"torch.load failed: {type(err).__name__}: {torch_reason}")


def _plain_global(name: str) -> bool:
    return name.startswith("torch.") or name in _PLAIN_GLOBALS or name == "argparse.Namespace"


def _zip_pickle(path: Path) -> Tuple[Optional[bytes], str]:
    """(the data.pkl bytes of a torch zip file, "") or (None, why the archive is unusable)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not names:
                return None, "it is a zip archive without the data.pkl of a torch.save checkpoint"
            return zf.read(names[0]), ""
    except zipfile.BadZipFile as err:
        return None, f"the zip archive is cut off or damaged ({err}); an interrupted download does this"
    except Exception as err:  # zlib / CRC errors inside members
        return None, f"a member of the zip archive is damaged ({type(err).__name__}: {str(err)[:120]})"


def _pickle_globals(data: bytes) -> Tuple[List[str], Optional[str]]:
    """Every module.name a pickle would import, read from its opcodes without unpickling anything.

    Scans the first pickle and, for the legacy torch format (magic number, protocol, sys info, object), the ones
    after it. Returns (globals, None), or (partial globals, problem) when the opcodes are truncated or invalid.
    """
    stream = io.BytesIO(data)
    found: List[str] = []
    for index in range(4):
        start = stream.tell()
        if start >= len(data):
            break
        strings: List[str] = []
        memo: Dict[int, object] = {}
        last: object = None
        first_int = None
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                            "BINSTRING", "STRING"):
                    last = arg
                    strings.append(str(arg))
                elif name == "MEMOIZE":
                    memo[len(memo)] = last
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = last
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    last = memo.get(int(arg))
                    if isinstance(last, str):
                        strings.append(last)
                elif name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                    last = None
                elif name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
                    last = None
                elif name in ("LONG1", "LONG4", "INT", "LONG") and first_int is None:
                    first_int = arg
                    last = None
                elif name != "STOP":
                    last = None
        except Exception as err:  # pickletools raises ValueError for unknown opcodes and truncated arguments
            return found, f"{type(err).__name__} at byte {stream.tell()}: {str(err)[:100]}"
        # legacy torch files start with the magic-number pickle; only then do more pickles follow
        if index == 0 and first_int != 0x1950A86A20F9469CFC6C:
            break
    return found, None
