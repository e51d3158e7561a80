"""Image preprocessing identical to the official `dust3r.utils.image.load_images` resize and crop rules.

The official code resizes 8-bit PIL images (LANCZOS when shrinking, BICUBIC otherwise), so float inputs are
quantised to 8 bits first: ComfyUI images come from 8-bit files, where this is exact.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InputError

MIN_SIDE = 64


def official_size_and_crop(width: int, height: int, size: int, square_ok: bool = False, patch_size: int = 16
                           ) -> Tuple[Tuple[int, int], Tuple[int, int, int, int], bool]:
    """The official geometry for one image of `width` x `height` pixels.

    Returns ((resized_w, resized_h), crop box (left, top, right, bottom) in the resized image, shrinking), where
    shrinking selects LANCZOS (else BICUBIC). size 224: the short side becomes ~224 and a centred square is cut;
    any other size: the long side becomes `size`, then the centred crop has sides that are multiples of
    `patch_size`, and a square result becomes 4:3 landscape unless square_ok.
    """
    if size == 224:
        long_edge = round(size * max(width / height, height / width))
    else:
        long_edge = size
    longest = max(width, height)
    resized = tuple(int(round(x * long_edge / longest)) for x in (width, height))
    W, H = resized
    cx, cy = W // 2, H // 2
    if size == 224:
        half = min(cx, cy)
        box = (cx - half, cy - half, cx + half, cy + half)
    else:
        halfw = ((2 * cx) // patch_size) * patch_size / 2
        halfh = ((2 * cy) // patch_size) * patch_size / 2
        if not square_ok and W == H:
            halfh = 3 * halfw / 4
        # halfw is a multiple of patch_size/2 and 3/4 of it is integral for even patch sizes: exact integers
        box = tuple(int(round(v)) for v in (cx - halfw, cy - halfh, cx + halfw, cy + halfh))
    return resized, box, longest > long_edge


def _to_pil_list(images) -> Tuple[List[Image.Image], torch.device]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}; convert "
                             "ComfyUI IMAGE (B, H, W, 3) with .permute(0, 3, 1, 2)")
        if images.shape[0] == 0:
            raise InputError("no images given")
        if not bool(torch.isfinite(images).all()):
            raise InputError("images contain NaN or infinite pixels; fix or drop the broken images")
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arr], images.device
    if isinstance(images, Sequence) and images and all(isinstance(im, Image.Image) for im in images):
        return [ImageOps.exif_transpose(im).convert("RGB") for im in images], torch.device("cpu")
    raise InputError(f"images must be an (N, 3, H, W) tensor or a list of PIL images, got {type(images).__name__}")


def prepare_images(images: Union[torch.Tensor, Sequence[Image.Image]], size: int = 512, square_ok: bool = False,
                   patch_size: int = 16) -> torch.Tensor:
    """Resize and crop views as the official `load_images(..., size)` does.

    images: (N, 3, H, W) float in [0, 1] (any device), or a list of PIL images (EXIF orientation applied).
    size: the model's native resolution, 512 (long side 512) or 224 (short side 224, centre square).
    Returns (N, 3, H', W') float32 in [0, 1] on the input's device (CPU for PIL input), H' and W' multiples of
    `patch_size` (for size 512). All views must end up the same size (same aspect ratio); else InputError.
    """
    pils, device = _to_pil_list(images)
    out = []
    for k, im in enumerate(pils):
        w, h = im.size
        if min(w, h) < MIN_SIDE:
            raise InputError(f"image {k} is {w}x{h} pixels; DUSt3R needs at least {MIN_SIDE} px on each side. "
                             "Use larger photos")
        resized, box, shrinking = official_size_and_crop(w, h, size, square_ok, patch_size)
        im = im.resize(resized, Image.LANCZOS if shrinking else Image.BICUBIC)
        im = im.crop(box)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
    shapes = {tuple(t.shape[1:]) for t in out}
    if len(shapes) > 1:
        raise InputError(f"after resizing to {size} the views have different sizes {sorted(shapes)}; DUSt3R pairs "
                         "need one size, so give all photos the same aspect ratio (crop them first)")
    return (torch.stack(out).float() / 255).to(device)
