"""`make demo`: the smoke run goes end to end, and missing weights stop it with the file, folder and address."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo.py"


def run_demo(*args, env=None):
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, RECONX_NO_DOWNLOAD="1", **(env or {})))


def test_tiny_smoke_run_writes_every_output(tmp_path):
    run = run_demo("--tiny", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    names = {p.name for p in tmp_path.iterdir()}
    for suffix in ("points.ply", "cameras.json", "depth.png", "frames.webp", "frames.png", "confidence.png",
                   "gaussians.ply", "flythrough.webp"):
        assert f"tiny_motorcycle_{suffix}" in names, sorted(names)
    cameras = json.loads((tmp_path / "tiny_motorcycle_cameras.json").read_text())
    assert cameras["smoke_run_with_random_weights"] is True
    assert "SMOKE RUN" in run.stdout + run.stderr


def test_missing_weights_name_file_folder_and_address(tmp_path):
    run = run_demo("--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out"))
    assert run.returncode != 0
    message = run.stdout + run.stderr
    assert "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth" in message
    assert str(tmp_path / "models" / "dust3r") in message
    assert "https://download.europe.naverlabs.com/ComputerVision/DUSt3R/" in message
    assert not list((tmp_path / "models" / "dust3r").glob("*.part")), "a half-written download was left behind"


def test_missing_video_weights_name_file_folder_and_address(tmp_path):
    dust3r = tmp_path / "models" / "dust3r"
    dust3r.mkdir(parents=True)
    (dust3r / "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth").write_bytes(b"placeholder, never loaded")
    run = run_demo("--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out"))
    assert run.returncode != 0
    message = run.stdout + run.stderr
    assert "dynamicrafter_512_interp.ckpt" in message and str(tmp_path / "models" / "reconx") in message
    assert "huggingface.co/Doubiiu/DynamiCrafter_512_Interp" in message
