#!/usr/bin/env python3
"""Train ReconX's structure branch (reconx_core.training; README "Training").

    accelerate launch scripts/train_structure.py --config configs/train/stage1.yaml \
        --data-root datasets/re10k --output-dir runs/stage1
    accelerate launch --config_file configs/accelerate/ddp_8gpu.yaml scripts/train_structure.py \
        --config configs/train/stage2.yaml --data-root datasets/re10k --data-root datasets/acid --output-dir runs/stage2
    accelerate launch --multi_gpu --num_processes 2 scripts/train_structure.py --config configs/train/tiny.yaml \
        --data-root DIR --output-dir out --max-steps 4          # two processes on a CPU-only machine (gloo)

Writes OUTPUT/train_log.jsonl (one line per optimizer step), OUTPUT/checkpoints/step_N (resume with
--resume-from OUTPUT/checkpoints/step_N, or --resume-from latest), tensorboard logs in OUTPUT/logs and, at the end,
OUTPUT/reconx_structure_stageN.safetensors: copy it into models/reconx and pick it as the video loader's
structure branch. Needs `pip install accelerate tensorboard`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reconx_core.errors import ReconXError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (configs/train/*.yaml)")
    parser.add_argument("--data-root", action="append", default=[],
                        help="dataset folder with its point-cloud cache (repeat for several: RE10K, ACID, DL3DV)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, help="stop after this optimizer step (default: the config's steps)")
    parser.add_argument("--resume-from", help="a checkpoint folder (OUTPUT/checkpoints/step_N) or 'latest'")
    parser.add_argument("--stage", type=int, choices=(1, 2), help="override the config's stage")
    parser.add_argument("--checkpoint", help="override model.checkpoint (the DynamiCrafter file)")
    parser.add_argument("--init-branch", help="override model.init_branch (stage 2: stage 1's export)")
    parser.add_argument("--device", help="cpu: run on the CPU even when CUDA is available (cuda, cuda:0: the GPUs "
                        "accelerate assigns, one per process)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override any config entry, e.g. --set optim.lr=1e-5 --set data.frames=16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from reconx_core.training.config import load_config
    from reconx_core.training.loop import train

    overrides: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = json.loads(value)
        except json.JSONDecodeError:
            node[leaf] = value
    if args.stage is not None:
        overrides["stage"] = args.stage
    if args.checkpoint:
        overrides.setdefault("model", {})["checkpoint"] = args.checkpoint
    if args.init_branch:
        overrides.setdefault("model", {})["init_branch"] = args.init_branch
    config = load_config(args.config, overrides)
    result = train(config, args.data_root, args.output_dir, max_steps=args.max_steps, resume_from=args.resume_from,
                   device="cpu" if (args.device or "").startswith("cpu") else None)
    if result["losses"]:
        print(f"steps {result['start_step']}..{result['steps']} on {result['world_size']} process(es): loss "
              f"{result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}" + (
                  f"; exported {result['export']}" if result["export"] else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReconXError as error:
        sys.exit(f"error: {error}")
