"""Our CLIP tokenizer and towers against open_clip itself, the library DynamiCrafter and ViewCrafter call.

The official embedders (lvdm/modules/encoders/condition.py) run open_clip's own modules in a fixed recipe:
FrozenOpenCLIPEmbedder takes the token + positional embedding, every text block but the last (layer
"penultimate") and ln_final; FrozenOpenCLIPImageEmbedderV2 takes conv1, the class token, positional embedding,
ln_pre and every visual block, with no ln_post / proj. The recipes are re-stated here on open_clip's modules with
random weights of a small width, and our towers are loaded from the same open_clip state dict through our key map.
"""

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is a test requirement (requirements-test.txt)")

from reconx_core.video.clip import ImageTower, TextTower  # noqa: E402
from reconx_core.video.comfy_layouts import tower_state  # noqa: E402
from reconx_core.video.tokenizer import ClipTokenizer, find_vocab  # noqa: E402

PROMPTS = [
    "",
    "Rotating view of a scene",
    "A living room with a sofa, two lamps & a TV; photo taken at 5:30pm!",
    "Ünïcödé café — naïve façade, 東京の夜景, emoji 🎥",
    "&amp; HTML entities &lt;b&gt; and   irregular\twhitespace\n",
    "don't can't it's 123,456.78 e-mail@example.com",
    " ".join(["a very long prompt that runs past the seventy-seven token context"] * 8),
]


def test_tokenizer_matches_open_clip():
    vocab = find_vocab()
    assert vocab is not None, "open_clip is installed, so its bpe_simple_vocab_16e6.txt.gz must be found"
    ours = ClipTokenizer(vocab_path=vocab)(PROMPTS)
    assert torch.equal(ours, open_clip.tokenize(PROMPTS))        # integer ids: exact by construction


def small_open_clip(seed: int = 0):
    """An open_clip CLIP of ViT-H-14's layout (patch 14, 224 px, 77-token causal text) at a small width."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=14,
                                                        image_size=224),
                 text_cfg=CLIPTextCfg(width=32, heads=4, layers=3, context_length=77, vocab_size=49408))
    with torch.no_grad():   # open_clip zero-initialises some tensors; random ones make every path count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def our_towers(model):
    """Our TextTower / ImageTower of the same size, loaded from open_clip's state dict through tower_state, the
    conversion the video loader applies to an open_clip file."""
    text, image = TextTower(width=32, layers=3, heads=4), ImageTower(width=32, layers=2, heads=4)
    source = model.state_dict()
    for tower, want, prefix in ((text, "text", "text_encoder."), (image, "image", "image_encoder.")):
        state = {k[len(prefix):]: v for k, v in tower_state(source, want).items()}
        tower.load_state_dict(state, strict=True)                   # every tensor the tower reads, named right
    return text.eval(), image.eval()


def official_text_features(model, tokens, layer_idx: int = 1):
    """FrozenOpenCLIPEmbedder.encode_with_transformer on open_clip's modules: layer_idx 1 ("penultimate", what
    DynamiCrafter uses) stops one block before the end, 0 ("last") runs them all."""
    x = model.token_embedding(tokens) + model.positional_embedding
    seq_first = not getattr(model.transformer, "batch_first", True)
    x = x.permute(1, 0, 2) if seq_first else x
    blocks = model.transformer.resblocks
    for block in blocks[:len(blocks) - layer_idx]:
        x = block(x, attn_mask=model.attn_mask)
    x = x.permute(1, 0, 2) if seq_first else x
    return model.ln_final(x)


def official_preprocess(images):
    """FrozenOpenCLIPImageEmbedderV2.preprocess: kornia bicubic resize to 224 (antialias on), [-1,1] -> [0,1],
    OpenAI CLIP mean/std."""
    import kornia

    x = kornia.geometry.resize(images, (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    return kornia.enhance.normalize((x + 1.0) / 2.0, mean, std)


def official_image_tokens(model, pixels):
    """FrozenOpenCLIPImageEmbedderV2.encode_with_vision_transformer on open_clip's modules (no ln_post/proj)."""
    visual = model.visual
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    seq_first = not getattr(visual.transformer, "batch_first", True)
    x = x.permute(1, 0, 2) if seq_first else x
    x = visual.transformer(x)
    return x.permute(1, 0, 2) if seq_first else x


# Tolerance for the towers: the same float32 operations in the same order on both sides (open_clip's blocks and
# ours both use nn.MultiheadAttention and nn.Linear), so most runs are bitwise; the bound allows other attention
# kernels' summation order, ~1e-7 relative per matmul over 3 (text) or 2 (image) blocks of width 32 — 1e-5 of the
# features' largest magnitude is ten times that, and a wrong weight, block count or layer norm moves them by O(1).
def assert_same_features(ours, reference):
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * reference.abs().max().item())


def test_text_tower_matches_open_clip():
    model = small_open_clip()
    text, _ = our_towers(model)
    tokens = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        reference = official_text_features(model, tokens)
        ours = text(tokens)
    assert ours.shape == (len(PROMPTS), 77, 32)
    assert_same_features(ours, reference)
    # the test tells the layers apart: a tower that ran every block would miss the bound by far
    with torch.no_grad():
        last = official_text_features(model, tokens, layer_idx=0)
    assert (last - reference).abs().max() > 100 * 1e-5 * reference.abs().max()


def test_image_tower_matches_open_clip():
    model = small_open_clip(seed=1)
    _, image = our_towers(model)
    images = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(2)) * 2 - 1   # [-1, 1], not square
    with torch.no_grad():
        reference = official_image_tokens(model, official_preprocess(images))
        ours = image(images)
    assert ours.shape == (2, 257, 32)
    assert_same_features(ours, reference)


def test_pinned_vocabulary_is_the_file_open_clip_ships():
    """The download list pins the vocabulary's SHA-256 and size; the installed open_clip's copy must match both."""
    import hashlib

    from reconx_core.downloads import known_file

    pinned = known_file("bpe_simple_vocab_16e6.txt.gz")
    data = find_vocab().read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (pinned.sha256, pinned.size)
