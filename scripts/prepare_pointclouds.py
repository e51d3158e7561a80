#!/usr/bin/env python3
"""Point-cloud cache for training the structure branch: DUSt3R + two-view alignment on each clip's first and last
frames, once, stored per clip (reconx_core.training.data describes the files).

    python scripts/prepare_pointclouds.py --data-root datasets/re10k \
        --dust3r models/dust3r/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth
    accelerate launch --multi_gpu --num_processes 8 scripts/prepare_pointclouds.py --data-root ... --dust3r ...

The cache goes to DATA_ROOT/pointclouds/SPLIT (or --cache-dir). Entries that exist are skipped, so a stopped run
continues with the same command; each file is written atomically. DL3DV scenes are long: --max-span 64 cuts them
into segments of 64 frames, each with its own cloud (RealEstate10K / ACID clips are used whole by default).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reconx_core.errors import ReconXError  # noqa: E402

log = logging.getLogger("reconx.prepare_pointclouds")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="RealEstate10K/ACID chunks (SPLIT/*.torch + index.json) "
                        "or DL3DV scene folders")
    parser.add_argument("--dust3r", required=True, help="DUSt3R/MASt3R checkpoint (.pth, .safetensors or HF folder)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--cache-dir", help="where the cache goes (default DATA_ROOT/pointclouds/SPLIT)")
    parser.add_argument("--max-clips", type=int, help="only the first N clips (in the dataset's order)")
    parser.add_argument("--max-span", type=int, help="cut clips into segments of at most N frames (DL3DV: 64)")
    parser.add_argument("--min-frames", type=int, default=2,
                        help="skip segments shorter than this (training itself skips segments shorter than its "
                             "data.frames)")
    parser.add_argument("--points", type=int, default=65536, help="points kept per cloud (even stride)")
    parser.add_argument("--min-conf", type=float, default=3.0, help="DUSt3R confidence a point must exceed")
    parser.add_argument("--downscale", type=int, default=1, help="DL3DV: read images_N/ (2, 4, 8)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from reconx_core.data import open_dataset
    from reconx_core.dust3r import load_dust3r
    from reconx_core.training.data import default_cache_dir
    from reconx_core.training.pointclouds import finish_cache, prepare_cache

    try:
        from accelerate import PartialState

        state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
        rank, world, device, is_main = state.process_index, state.num_processes, state.device, state.is_main_process
        barrier = state.wait_for_everyone
    except ImportError:
        log.warning("accelerate is not installed: one process (pip install accelerate to shard over GPUs)")
        rank, world, is_main, barrier = 0, 1, True, (lambda: None)
        device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")

    dataset = open_dataset(args.data_root, args.split, args.downscale)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.data_root, args.split)
    keys = dataset.keys()[:args.max_clips] if args.max_clips else dataset.keys()
    weights = Path(args.dust3r)
    if not weights.exists():
        raise SystemExit(f"error: the DUSt3R checkpoint {weights} does not exist (README, Model files)")
    dust3r = load_dust3r(str(weights), device=device).eval()
    log.info("process %d/%d: %d clips of %s -> %s", rank, world, len(keys[rank::world]), args.data_root, cache_dir)
    result = prepare_cache(dataset, dust3r, cache_dir, keys, max_span=args.max_span, min_frames=args.min_frames,
                           min_conf=args.min_conf, max_points=args.points, rank=rank, world=world,
                           dust3r_name=weights.name,
                           callback=lambda done, total, key: log.info("[%d/%d] %s", done, total, key))
    log.info("process %d: %d written, %d already there, %d failed", rank, result["written"], result["skipped"],
             len(result["failed"]))
    barrier()
    if is_main:
        index = finish_cache(cache_dir)
        print(f"{len(index)} cache entries in {cache_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReconXError as error:
        sys.exit(f"error: {error}")
