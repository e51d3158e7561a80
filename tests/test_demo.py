"""`make demo`: the smoke run goes end to end, and missing weights stop it with the file, folder and address."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _demo_module():
    sys.path.insert(0, str(REPO / "scripts"))
    import demo

    return demo


def test_video_weights_found_as_comfyui_files(tmp_path):
    """ComfyUI's pruned file (also in models/checkpoints/dynamicrafter) with a CLIP ViT-H file is enough."""
    demo = _demo_module()
    (tmp_path / "checkpoints" / "dynamicrafter").mkdir(parents=True)
    (tmp_path / "clip_vision").mkdir()
    pruned = tmp_path / "checkpoints" / "dynamicrafter" / demo.PRUNED_FILE
    vision = tmp_path / "clip_vision" / demo.CLIP_VISION_FILE
    pruned.write_bytes(b"x")
    vision.write_bytes(b"x")
    assert demo.find_video_weights(None, tmp_path) == (pruned, vision)


def test_demo_downloads_through_the_shared_download_code(tmp_path, monkeypatch):
    """--download fetches the missing files with reconx_core.downloads.ensure_file, into the right folders."""
    demo = _demo_module()
    fetched = []

    def fake_ensure(known, folders, progress=None):
        fetched.append((known.name, folders[0]))
        return folders[0] / known.name

    monkeypatch.setattr(demo, "ensure_file", fake_ensure)
    video, vision = demo.find_video_weights(None, tmp_path, allow_download=True)
    assert fetched == [(demo.PRUNED_FILE, tmp_path / "reconx"), (demo.OPENCLIP_FILE, tmp_path / "text_encoders")]
    assert (video, vision) == (tmp_path / "reconx" / demo.PRUNED_FILE, tmp_path / "text_encoders" / demo.OPENCLIP_FILE)
    assert demo.find_weights(None, tmp_path, allow_download=True) == tmp_path / "dust3r" / demo.DUST3R_FILE
    monkeypatch.setenv("RECONX_NO_DOWNLOAD", "1")
    with pytest.raises(SystemExit, match="licence:  CC BY-NC-SA 4.0"):
        demo.find_weights(None, tmp_path / "elsewhere")
