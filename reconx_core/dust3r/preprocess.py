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


def prepare_views(images: Sequence[torch.Tensor], size: int = 512, square_ok: bool = False, patch_size: int = 16
                  ) -> Tuple[torch.Tensor, List[int]]:
    """`prepare_images` for photos of different sizes: one (N, 3, H', W') batch of one shared size.

    images: a sequence of (3, H, W) float tensors in [0, 1] (any device), each of its own size.
    Returns (views (N, 3, H', W') float32 in [0, 1] on the first image's device, indices of the photos that lost
    more than 2 % of their area to a crop to another aspect ratio than their own).

    The official DUSt3R code infers pairs of differently-sized views one pair at a time and aligns them at their
    own sizes. The ReconX stages after the alignment need one size (one video resolution, one camera size for the
    3DGS fit), so the views are brought to one shape here, with as little loss as possible: every photo gets the
    official resize and crop on its own; when the results differ, the shape most photos got (the earliest on a
    tie) is kept, and each other photo is centre-cropped to that shape's aspect ratio before one resize to it (a
    single resampling, LANCZOS when shrinking as in the official code). Photos that share the common shape come out
    exactly as `prepare_images` gives them. With size 224 every view is a centred square, so nothing is cut.
    """
    if not isinstance(images, Sequence) or not images or not all(isinstance(im, torch.Tensor) for im in images):
        raise InputError("images must be a non-empty list of (3, H, W) tensors in [0, 1]")
    geometry = []
    for k, im in enumerate(images):
        if im.dim() != 3 or im.shape[0] != 3:
            raise InputError(f"photo {k + 1} of {len(images)} has shape {tuple(im.shape)}; expected (3, H, W) in "
                             "[0, 1]")
        h, w = int(im.shape[1]), int(im.shape[2])
        if min(w, h) < MIN_SIDE:
            raise InputError(f"photo {k + 1} of {len(images)} is {w}x{h} pixels; DUSt3R needs at least {MIN_SIDE} px "
                             "on each side. Use larger photos")
        _, box, _ = official_size_and_crop(w, h, size, square_ok, patch_size)
        geometry.append((box[2] - box[0], box[3] - box[1]))
    counts = {shape: geometry.count(shape) for shape in geometry}
    target = max(geometry, key=lambda shape: (counts[shape], -geometry.index(shape)))
    out, cut = [], []
    for k, (im, shape) in enumerate(zip(images, geometry)):
        if shape == target:
            out.append(prepare_images(im[None], size, square_ok, patch_size)[0].cpu())
            continue
        (pil,), _ = _to_pil_list(im[None])
        w, h = pil.size
        tw, th = target
        # the largest centred box of the target's aspect ratio, in whole pixels
        if w * th > h * tw:
            cw, ch = max(1, round(h * tw / th)), h
        else:
            cw, ch = w, max(1, round(w * th / tw))
        left, top = (w - cw) // 2, (h - ch) // 2
        pil = pil.crop((left, top, left + cw, top + ch))
        pil = pil.resize((tw, th), Image.LANCZOS if cw > tw else Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255)
        if cw * ch < 0.98 * w * h:  # more than rounding: a visible part of the photo is gone
            cut.append(k)
    return torch.stack(out).to(images[0].device), cut
