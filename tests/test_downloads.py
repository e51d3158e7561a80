"""Downloads that ask first, offline: a local HTTP server stands in for the publishers. Progress, size and
checksum checks, a connection closed midway, cancelling, switched-off downloads and no network all leave no file
behind; the loader lists show present files of their kind plus the known absent ones, marked."""

import hashlib
import http.server
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from nodes import comfy_bridge as bridge
from reconx_core.downloads import (CHOICE_MARK, KNOWN_FILES, DownloadsDisabled, KnownFile, absent_choices, download,
                                   ensure_file, known_file, parse_choice)
from reconx_core.errors import CheckpointError, ResourceError
from reconx_core.model_files import classify_model_file

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # a bit over 3 chunks of 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    hits = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.hits.append(self.path)
        if self.path == "/missing":
            self.send_error(404)
            return
        body = PAYLOAD
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/cut":
            self.wfile.write(body[:len(body) // 2])  # promise everything, send half, close
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def downloads_on(monkeypatch):
    monkeypatch.delenv("RECONX_NO_DOWNLOAD", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _known(url, **kw):
    fields = dict(name="weights.safetensors", folder="reconx", kind="video", approx_bytes=len(PAYLOAD),
                  licence="MIT", url=url, page="https://example.org/weights", size=len(PAYLOAD),
                  sha256=hashlib.sha256(PAYLOAD).hexdigest())
    fields.update(kw)
    return KnownFile(**fields)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_reports_progress_and_verifies(server, tmp_path):
    calls = []
    path = download(_known(server + "/ok"), tmp_path / "reconx", progress=lambda d, t: calls.append((d, t)))
    assert path == tmp_path / "reconx" / "weights.safetensors" and path.read_bytes() == PAYLOAD
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in calls] == sorted({d for d, _ in calls}) and len(calls) >= 3  # increasing, per chunk
    assert all(t == len(PAYLOAD) for _, t in calls)
    assert _leftovers(tmp_path / "reconx") == ["weights.safetensors"]  # no partial file beside it


def test_unpinned_file_is_checked_by_the_servers_size(server, tmp_path):
    path = download(_known(server + "/ok", size=None, sha256=None), tmp_path)
    assert path.read_bytes() == PAYLOAD


@pytest.mark.parametrize("change, error, match", [
    ({"sha256": "0" * 64}, CheckpointError, "SHA-256 .* expected 0000"),
    ({"sha256": None, "sha256_prefix": "deadbeef"}, CheckpointError, "expected deadbeef"),
    ({"size": len(PAYLOAD) + 1}, CheckpointError, "offers .* bytes"),
])
def test_a_wrong_file_is_deleted(server, tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        download(_known(server + "/ok", **change), tmp_path)
    assert _leftovers(tmp_path) == []


def test_a_connection_closed_midway_leaves_no_file(server, tmp_path):
    with pytest.raises(ResourceError, match="weights.safetensors") as info:
        download(_known(server + "/cut"), tmp_path)
    assert "download: " + server + "/cut" in str(info.value)  # the manual steps
    assert _leftovers(tmp_path) == []


def test_cancelling_leaves_no_file(server, tmp_path):
    def cancel(done, total):
        if done > (1 << 20):
            raise bridge.Interrupted("cancelled")

    with pytest.raises(bridge.Interrupted):
        download(_known(server + "/ok"), tmp_path, progress=cancel)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("var", ["RECONX_NO_DOWNLOAD", "HF_HUB_OFFLINE"])
def test_switched_off_downloads_give_the_manual_steps(server, tmp_path, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    hits = len(_Handler.hits)
    known = _known(server + "/ok")
    with pytest.raises(DownloadsDisabled, match=f"{var}=1") as info:
        download(known, tmp_path / "reconx", progress=lambda d, t: None)
    message = str(info.value)
    for part in ("file:     weights.safetensors", f"folder:   {tmp_path / 'reconx'}", f"download: {server}/ok",
                 "licence:  MIT", known.sha256):
        assert part in message
    assert len(_Handler.hits) == hits  # nothing was requested


def test_no_network_and_http_errors_give_the_manual_steps(server, tmp_path):
    with pytest.raises(ResourceError, match="HTTP 404.*\n.*file:     weights"):
        download(_known(server + "/missing"), tmp_path)
    with pytest.raises(ResourceError, match="no connection"):
        download(_known("http://127.0.0.1:9/closed"), tmp_path)  # the discard port: nothing listens
    assert _leftovers(tmp_path) == []


def test_present_files_are_found_not_fetched(server, tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "weights.safetensors").write_bytes(b"mine")
    hits = len(_Handler.hits)
    assert ensure_file(_known(server + "/ok"), [tmp_path / "b", tmp_path / "a"]) == \
        tmp_path / "a" / "sub" / "weights.safetensors"
    assert len(_Handler.hits) == hits


def test_registry_entries_are_complete_and_choices_parse():
    names = [k.name for k in KNOWN_FILES]
    assert len(names) == len(set(names))
    for known in KNOWN_FILES:
        assert known.url.startswith("https://") and known.licence and known.provenance
        assert known.sha256 is None or len(known.sha256) == 64
        assert parse_choice(known.choice) is known and known_file(known.name) is known
        assert known.choice.startswith(CHOICE_MARK) and "download)" in known.choice
    assert parse_choice("DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth") is None
    pruned = known_file("dynamicrafter_512_interp_fp16_pruned.safetensors")
    assert pruned.choice == ("⬇ dynamicrafter_512_interp_fp16_pruned.safetensors (3.1 GB, DynamiCrafter licence, "
                             "download)")
    choices = absent_choices("dust3r", {"dust3r"}, ["sub/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth"])
    assert len(choices) == 3 and not any("512_dpt" in c for c in choices)


def test_hf_endpoint_redirects_hugging_face_addresses(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    pruned = known_file("dynamicrafter_512_interp_fp16_pruned.safetensors")
    assert pruned.resolved_url == ("https://mirror.example/Kijai/DynamiCrafter_pruned/resolve/main/"
                                   "dynamicrafter_512_interp_fp16_pruned.safetensors")
    assert known_file("alexnet-owt-7be5be79.pth").resolved_url.startswith("https://download.pytorch.org/")


# ------------------------------------------------------------------------------------------- kinds and lists
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A fallback models folder holding one file of every kind (tiny tensors, the right names)."""
    from reconx_core.testing import write_tiny_models
    from reconx_core.video.comfy_layouts import internal_to_openclip, internal_to_transformers_vision
    from reconx_core.video.model import build_video_model, tiny_config

    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root)
    model = build_video_model(tiny_config(), seed=0)
    visual = {k: v for k, v in model.state_dict().items() if k.startswith("image_encoder.visual.")}
    towers = {k: v for k, v in model.state_dict().items() if k.startswith(("image_encoder.", "text_encoder."))}
    (root / "clip_vision").mkdir()
    (root / "text_encoders").mkdir()
    save_file(internal_to_transformers_vision(visual), str(root / "clip_vision" / "vit_h.safetensors"))
    save_file(internal_to_openclip(towers), str(root / "clip_vision" / "both_towers.safetensors"))
    save_file({k: v for k, v in internal_to_openclip(towers).items() if not k.startswith("visual.")},
              str(root / "text_encoders" / "openclip_text.safetensors"))
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(2, 2)},
              str(root / "text_encoders" / "t5_or_clip_l.safetensors"))
    (root / "reconx" / "model.ckpt").write_bytes(b"pickle, never read")
    (root / "reconx" / "alexnet-owt-7be5be79.pth").write_bytes(b"never read")
    (root / "dust3r" / "hf_512_dpt").mkdir()
    (root / "dust3r" / "hf_512_dpt" / "config.json").write_text("{}")
    os.link(root / "dust3r" / "tiny_224_dpt_random.safetensors", root / "dust3r" / "hf_512_dpt" / "model.safetensors")
    (root / "reconx" / "broken.safetensors").write_bytes(b"\x00" * 4)
    return root


def test_files_are_classified_by_header_or_name(models):
    kinds = {p.relative_to(models).as_posix(): classify_model_file(p) for p in models.rglob("*.*")
             if p.suffix != ".json"}
    expected = {
        "dust3r/tiny_224_dpt_random.safetensors": "dust3r", "dust3r/hf_512_dpt/model.safetensors": "dust3r",
        "reconx/tiny_dynamicrafter_random.safetensors": "video", "reconx/tiny_structure_branch_random.safetensors":
        "structure", "reconx/model.ckpt": "unknown", "reconx/alexnet-owt-7be5be79.pth": "lpips",
        "reconx/broken.safetensors": "damaged", "clip_vision/vit_h.safetensors": "clip_vision",
        "clip_vision/both_towers.safetensors": "openclip", "text_encoders/openclip_text.safetensors": "text_encoder",
        "text_encoders/t5_or_clip_l.safetensors": "other"}
    assert {k: kinds[k] for k in expected} == expected


def test_loader_lists_show_each_kind_and_marked_downloads(models, monkeypatch):
    from nodes.loader_nodes import ReconXDust3rLoader, ReconXVideoModelLoader

    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", models)
    video = ReconXVideoModelLoader.INPUT_TYPES()
    ckpts, branches = video["required"]["ckpt_name"][0], video["required"]["structure_name"][0]
    present = [c for c in ckpts if not c.startswith(CHOICE_MARK)]
    # the video-kind files (write_tiny_models may add other tiny video models), never the branch, LPIPS or damaged
    assert present[0] == "model.ckpt" and "tiny_dynamicrafter_random.safetensors" in present
    assert all(classify_model_file(models / "reconx" / f) in ("video", "unknown") for f in present)
    assert [parse_choice(c).name for c in ckpts if c.startswith(CHOICE_MARK)] == [
        "dynamicrafter_512_interp_fp16_pruned.safetensors", "dynamicrafter_512_interp.ckpt"]
    assert branches == ["none", "tiny_structure_branch_random.safetensors"]
    clip = video["optional"]["clip_vision_name"][0]
    assert clip == ["auto", "both_towers.safetensors", "vit_h.safetensors",
                    known_file("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors").choice]
    text = video["optional"]["text_encoder_name"][0]
    assert text == ["auto", "none (empty prompts only)", "openclip_text.safetensors",
                    known_file("open_clip_ViT-H-14-laion2B-s32B-b79K.safetensors").choice]
    dust3r = ReconXDust3rLoader.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert dust3r[:2] == ["hf_512_dpt/model.safetensors", "tiny_224_dpt_random.safetensors"]
    assert len(dust3r) == 2 + 4  # + the three DUSt3R and the MASt3R checkpoints, marked
    assert ReconXVideoModelLoader.VALIDATE_INPUTS(ckpts[-1], "none", clip[-1], text[-1]) is True
    assert "not in models/reconx" in ReconXVideoModelLoader.VALIDATE_INPUTS("gone.ckpt")


def test_choosing_a_marked_file_downloads_it_once(models, server, monkeypatch, tmp_path):
    """The node path: model_path on a '⬇' choice downloads into the first folder with the progress bar; a later
    call (or a stale choice) finds the file."""
    import reconx_core.downloads as downloads

    root = tmp_path / "models"
    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", root)
    known = _known(server + "/ok", name="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", folder="clip_vision",
                   kind="clip_vision")
    monkeypatch.setattr(downloads, "KNOWN_FILES", (known,))
    choice = bridge.list_models("clip_vision", {"clip_vision"})[-1]
    assert choice == known.choice
    steps = []
    monkeypatch.setattr(bridge.Progress, "phase", lambda self, w: lambda d, t: steps.append((d, t)))
    path = bridge.model_path("clip_vision", choice)
    assert path == root / "clip_vision" / known.name and path.read_bytes() == PAYLOAD and steps[-1][0] == steps[-1][1]
    hits = len(_Handler.hits)
    assert bridge.model_path("clip_vision", choice) == path and len(_Handler.hits) == hits
    # present now and no longer marked (the random test bytes classify as a damaged header)
    assert bridge.list_models("clip_vision", {"clip_vision", "damaged"}) == [known.name]
    assert bridge.validate_choice("clip_vision", choice) is True


def test_an_empty_folder_never_starts_on_a_download(tmp_path, monkeypatch):
    from nodes.loader_nodes import ReconXDust3rLoader

    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", tmp_path)
    choices = ReconXDust3rLoader.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert choices[0] == bridge.NO_FILE and all(c.startswith(CHOICE_MARK) for c in choices[1:])
    assert "pick an entry marked ⬇" in ReconXDust3rLoader.VALIDATE_INPUTS(choices[0])
    with pytest.raises(CheckpointError, match="no model file is chosen"):
        ReconXDust3rLoader().load(choices[0], "fp32", "cpu")
