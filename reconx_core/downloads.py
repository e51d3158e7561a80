"""Known model files and downloads that ask first.

`KNOWN_FILES` lists the files the pack can use that a user may not have yet: name, model folder, size, licence,
publisher's address and, where the publisher shows it, the SHA-256. Nothing is ever fetched unless a caller asks
for one file (a user picking "⬇ name (...)" in a loader list, or `make demo`). `download`:

- streams the file (urllib, 1 MiB chunks) into a hidden temporary file in the target folder, hashing while it
  writes and reporting progress(done_bytes, total_bytes) (the callback may raise to cancel);
- checks the size (the published size, else the server's Content-Length) and the pinned SHA-256 (or the
  torchvision-style hash prefix in the name); files without a published SHA-256 are checked by size only;
- renames it into place (os.replace) only when complete and verified; on any failure or interruption the partial
  file is removed, so a file with the final name is always whole.

RECONX_NO_DOWNLOAD=1 or HF_HUB_OFFLINE=1 turn downloads off; that, and any network failure, ends in a
ResourceError giving the manual steps (file, folder, address, size, licence). Hugging Face addresses honour
HF_ENDPOINT and send HF_TOKEN when set. urllib rather than huggingface_hub: one code path for every publisher,
with our own progress callback and the hash computed while streaming.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Union

from .errors import CheckpointError, ResourceError

PathLike = Union[str, os.PathLike]
Progress = Callable[[int, int], None]
CHOICE_MARK = "⬇ "
_NC = "CC BY-NC-SA 4.0"


@dataclass(frozen=True)
class KnownFile:
    """A downloadable model file.

    name: file name in its folder; folder: the model folder it belongs in ("dust3r", "reconx", "clip_vision",
    "text_encoders", ComfyUI's names); kind: what model_files.classify_model_file calls it; approx_bytes: for
    display; url: the publisher's download address (a Hugging Face `resolve` URL or another); page: where a person
    reads about it; size: exact bytes when published; sha256: when the publisher's page shows it;
    sha256_prefix: the hash prefix a torchvision file name carries; provenance: where size/hash come from.
    """

    name: str
    folder: str
    kind: str
    approx_bytes: int
    licence: str
    url: str
    page: str
    size: Optional[int] = None
    sha256: Optional[str] = None
    sha256_prefix: Optional[str] = None
    provenance: str = ""
    note: str = ""

    @property
    def resolved_url(self) -> str:
        """`url` with HF_ENDPOINT in place of https://huggingface.co when set (mirrors)."""
        endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/")
        if endpoint and self.url.startswith("https://huggingface.co/"):
            return endpoint + self.url[len("https://huggingface.co"):]
        return self.url

    @property
    def choice(self) -> str:
        """How a loader list shows it while absent: '⬇ name (3.1 GB, licence, download)'."""
        size = human_size(self.size) if self.size else "~" + human_size(self.approx_bytes)
        return f"{CHOICE_MARK}{self.name} ({size}, {self.licence}, download)"


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


_DUST3R_URL = "https://download.europe.naverlabs.com/ComputerVision/DUSt3R/"
_HF = "https://huggingface.co/"
KNOWN_FILES: Sequence[KnownFile] = (
    KnownFile("DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth", "dust3r", "dust3r", 2_290_000_000, _NC,
              _DUST3R_URL + "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth", "https://github.com/naver/dust3r#checkpoints",
              provenance="naver publishes no checksum; mirrors disagree, so none is pinned (checked by size)"),
    KnownFile("DUSt3R_ViTLarge_BaseDecoder_512_linear.pth", "dust3r", "dust3r", 2_130_000_000, _NC,
              _DUST3R_URL + "DUSt3R_ViTLarge_BaseDecoder_512_linear.pth", "https://github.com/naver/dust3r#checkpoints",
              provenance="naver publishes no checksum (checked by size)"),
    KnownFile("DUSt3R_ViTLarge_BaseDecoder_224_linear.pth", "dust3r", "dust3r", 2_130_000_000, _NC,
              _DUST3R_URL + "DUSt3R_ViTLarge_BaseDecoder_224_linear.pth", "https://github.com/naver/dust3r#checkpoints",
              provenance="naver publishes no checksum (checked by size)"),
    KnownFile("MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth", "dust3r", "dust3r", 2_760_000_000, _NC,
              "https://download.europe.naverlabs.com/ComputerVision/MASt3R/"
              "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth", "https://github.com/naver/mast3r#checkpoints",
              provenance="naver publishes no checksum (checked by size)"),
    KnownFile("dynamicrafter_512_interp_fp16_pruned.safetensors", "reconx", "video", 3_142_870_350,
              "DynamiCrafter licence",
              _HF + "Kijai/DynamiCrafter_pruned/resolve/main/dynamicrafter_512_interp_fp16_pruned.safetensors",
              _HF + "Kijai/DynamiCrafter_pruned", size=3_142_870_350,
              sha256="c6f50c98f1ec3b97ecfb347e2378e721cf796ebc866692631435070510e09b3d",
              provenance="LFS size and SHA-256 on the file's Hugging Face page",
              note="UNet, VAE and image projection in float16; needs a clip_vision file"),
    KnownFile("dynamicrafter_512_interp.ckpt", "reconx", "video", 10_400_000_000, "DynamiCrafter licence",
              _HF + "Doubiiu/DynamiCrafter_512_Interp/resolve/main/model.ckpt",
              _HF + "Doubiiu/DynamiCrafter_512_Interp",
              provenance="the SHA-256 was not found in the sources read (checked by size)",
              note="the original checkpoint (model.ckpt, renamed), float32, with both CLIP towers"),
    KnownFile("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_vision", "clip_vision", 2_528_373_448, "MIT",
              _HF + "h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
              _HF + "h94/IP-Adapter/tree/main/models/image_encoder", size=2_528_373_448,
              sha256="6ca9667da1ca9e0b0f75e46bb030f7e011f44f86cbfb8d5a36590fcd7507b030",
              provenance="LFS SHA-256 on the file's Hugging Face page (h94/IP-Adapter); size from identical mirrors, "
                         "reproduced from the layout",
              note="OpenCLIP ViT-H-14 laion2B image encoder, transformers layout (the file IP-Adapter users have)"),
    KnownFile("open_clip_ViT-H-14-laion2B-s32B-b79K.safetensors", "text_encoders", "openclip", 3_944_517_836, "MIT",
              _HF + "laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main/open_clip_pytorch_model.safetensors",
              _HF + "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", size=3_944_517_836,
              provenance="size from mirrors, reproduced from the open_clip layout; laion's SHA-256 not found in the "
                         "sources read (checked by size)",
              note="laion's open_clip_pytorch_model.safetensors, renamed: both CLIP towers (text prompts)"),
    KnownFile("bpe_simple_vocab_16e6.txt.gz", "reconx", "vocab", 1_356_917, "MIT",
              "https://github.com/mlfoundations/open_clip/raw/main/src/open_clip/bpe_simple_vocab_16e6.txt.gz",
              "https://github.com/mlfoundations/open_clip", size=1_356_917,
              sha256="924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
              provenance="computed from the file shipped in the open_clip_torch 2.22.0 wheel",
              note="CLIP tokenizer vocabulary, for non-empty prompts"),
    KnownFile("alexnet-owt-7be5be79.pth", "reconx", "lpips", 244_000_000, "BSD-3-Clause",
              "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
              "https://pytorch.org/vision/stable/models/alexnet.html", sha256_prefix="7be5be79",
              provenance="torchvision's SHA-256 prefix in the file name", note="LPIPS backbone"),
)


def known_file(name: str) -> Optional[KnownFile]:
    """The registry entry of a file name, or None."""
    return next((k for k in KNOWN_FILES if k.name == name), None)


def parse_choice(choice: str) -> Optional[KnownFile]:
    """The KnownFile a loader list's '⬇ name (...)' entry stands for, or None for a plain file name."""
    if not choice.startswith(CHOICE_MARK):
        return None
    name = choice[len(CHOICE_MARK):].split(" (", 1)[0]
    return known_file(name)


def absent_choices(folder: str, kinds: Iterable[str], present: Iterable[str]) -> List[str]:
    """'⬇ ...' entries for the known files of `kinds` in `folder` whose names are not among `present`
    (names relative to their folder; a file in a subfolder counts by its base name)."""
    kinds = set(kinds)
    have = {Path(p).name for p in present}
    return [k.choice for k in KNOWN_FILES if k.folder == folder and k.kind in kinds and k.name not in have]


# ----------------------------------------------------------------------------------------------- downloading
def downloads_disabled() -> Optional[str]:
    """Why downloads are off (the variable that says so), or None."""
    for var in ("RECONX_NO_DOWNLOAD", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


def manual_steps(known: KnownFile, folder: PathLike) -> str:
    """The lines telling a person how to put the file in place by hand."""
    check = (f"SHA-256 {known.sha256}" if known.sha256 else
             f"SHA-256 starts with {known.sha256_prefix}" if known.sha256_prefix else "no published SHA-256")
    size = f"{known.size:,} bytes" if known.size else f"about {human_size(known.approx_bytes)}"
    return (f"  file:     {known.name}\n"
            f"  folder:   {folder}\n"
            f"  download: {known.resolved_url}\n"
            f"  about:    {known.page}\n"
            f"  size:     {size}; {check}\n"
            f"  licence:  {known.licence}")


class DownloadsDisabled(ResourceError):
    """Downloads are switched off by the environment; the message holds the manual steps."""


def _open(url: str, timeout: float):
    headers = {"User-Agent": "reconx-comfyui"}
    token = os.environ.get("HF_TOKEN")
    if token and "huggingface" in url:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def download(known: KnownFile, folder: PathLike, progress: Optional[Progress] = None, *,
             chunk_bytes: int = 1 << 20, timeout: float = 30.0, opener=None) -> Path:
    """Fetch `known` into `folder` and return its path (see the module docstring for the guarantees).

    progress(done_bytes, total_bytes) is called as bytes arrive (at most ~500 times) and may raise to cancel.
    opener(url, timeout) -> a response with .read(n) and .headers (tests pass their own). Raises
    DownloadsDisabled, ResourceError (network failure or a connection cut short: with the manual steps),
    CheckpointError (size or SHA-256 mismatch: the file was deleted), or what `progress` raised.
    """
    folder = Path(folder)
    target = folder / known.name
    if target.is_file():
        return target
    reason = downloads_disabled()
    if reason:
        raise DownloadsDisabled(f"{known.name} is not here and downloads are switched off ({reason}). Put it in "
                                f"place by hand:\n{manual_steps(known, folder)}")
    folder.mkdir(parents=True, exist_ok=True)
    need = known.size or known.approx_bytes
    free = _free_bytes(folder)
    if free is not None and free < need:
        raise ResourceError(f"{known.name} needs {human_size(need)} but {folder} has {human_size(free)} free; make "
                            f"room or download it by hand to another disk:\n{manual_steps(known, folder)}")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{known.name}.", suffix=".part")
    tmp = Path(tmp_name)
    url = known.resolved_url
    try:
        digest = hashlib.sha256()
        done = 0
        with os.fdopen(fd, "wb") as out:
            try:
                response = (opener or _open)(url, timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
                raise ResourceError(f"could not download {known.name} ({_reason(err)}). Download it by hand:\n"
                                    f"{manual_steps(known, folder)}") from None
            with response:
                offered = int(response.headers.get("Content-Length") or 0) or None
                if known.size and offered and offered != known.size:
                    raise CheckpointError(f"{url} offers {offered:,} bytes, but {known.name} has {known.size:,}; "
                                          f"the address no longer serves that file. Download it by hand:\n"
                                          f"{manual_steps(known, folder)}")
                total = known.size or offered or 0
                step = max(chunk_bytes, total // 500) if total else chunk_bytes
                reported = 0
                while True:
                    try:
                        block = response.read(chunk_bytes)
                    except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as err:
                        raise ResourceError(f"the download of {known.name} broke off after {human_size(done)} "
                                            f"({_reason(err)}); nothing was kept. Try again, or download it by "
                                            f"hand:\n{manual_steps(known, folder)}") from None
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress is not None and (done - reported >= step or done == total):
                        reported = done
                        progress(done, max(total, done))
            expected = known.size or offered
            if expected is not None and done != expected:
                raise ResourceError(f"the download of {known.name} stopped after {done:,} of {expected:,} bytes (the "
                                    f"connection closed); nothing was kept. Try again, or download it by hand:\n"
                                    f"{manual_steps(known, folder)}")
            got = digest.hexdigest()
            wanted = known.sha256 or known.sha256_prefix
            if wanted and not got.startswith(wanted):
                raise CheckpointError(f"the download of {known.name} has SHA-256 {got}, expected "
                                      f"{known.sha256 or known.sha256_prefix + '...'}; it was deleted. Try again, or "
                                      f"download it by hand:\n{manual_steps(known, folder)}")
            if progress is not None and reported != done:
                progress(done, done)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)  # atomic on one filesystem: the final name only ever holds a whole, checked file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def ensure_file(known: KnownFile, folders: Sequence[PathLike], progress: Optional[Progress] = None) -> Path:
    """An existing copy in any of `folders` (by name, also one level of subfolders), else a download into the
    first."""
    for folder in folders:
        folder = Path(folder)
        for candidate in (folder / known.name, *folder.glob(f"*/{known.name}")):
            if candidate.is_file():
                return candidate
    return download(known, folders[0], progress)


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        import shutil

        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"no connection: {err.reason}"
    return f"{type(err).__name__}: {err}"
