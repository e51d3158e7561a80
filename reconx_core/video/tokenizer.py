"""OpenCLIP's byte-level BPE tokenizer (77 tokens, lower-cased), reading the public vocab file.

Decision: our own small BPE instead of depending on open_clip_torch (which pulls timm, ftfy and
huggingface_hub just for this). The merges come from `bpe_simple_vocab_16e6.txt.gz`, looked up in this order:
an explicit path, $RECONX_CLIP_BPE, next to the video checkpoint (models/reconx), and open_clip's package folder
if that package is installed (found without importing it). The empty prompt, which the official interpolation
uses, needs no vocab at all: it is [<start>, <end>, 0, ...].

Deviation: open_clip runs `ftfy.fix_text` (mojibake repair) first; we only unescape HTML. Prompts in clean UTF-8
tokenise identically.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, List, Optional, Union

import regex
import torch

from ..errors import ResourceError

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
SOT, EOT = 49406, 49407
NUM_MERGES = 49152 - 256 - 2
# Fixed prompts of the backbones, tokenised once with the real vocabulary (open_clip 2.22, ViewCrafter's recorded
# run: tests/data/viewcrafter_tiny_io.safetensors), so that they work without the vocabulary file.
KNOWN_PROMPTS = {"rotating view of a scene": (32265, 1093, 539, 320, 3562)}
_PATTERN = regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                         regex.IGNORECASE)


@lru_cache()
def _byte_alphabet() -> dict:
    """Reversible byte -> printable unicode character map of GPT-2/CLIP BPE (avoids whitespace/control chars).

    Insertion order matters: the vocabulary lists the printable bytes first, then the remapped ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    remapped = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(remapped)})
    return table


def find_vocab(search_dirs: Iterable[Union[str, Path]] = ()) -> Optional[Path]:
    """First existing `bpe_simple_vocab_16e6.txt.gz` among $RECONX_CLIP_BPE, search_dirs and open_clip's folder."""
    candidates = []
    if os.environ.get("RECONX_CLIP_BPE"):
        candidates.append(Path(os.environ["RECONX_CLIP_BPE"]))
    candidates += [Path(d) / VOCAB_NAME for d in search_dirs]
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / VOCAB_NAME)
    return next((c for c in candidates if c.is_file()), None)


class ClipTokenizer:
    """Text -> (B, 77) int64 token ids as open_clip.tokenize does (SOT, BPE ids, EOT, zero padding)."""

    def __init__(self, vocab_path: Optional[Union[str, Path]] = None, search_dirs: Iterable[Union[str, Path]] = ()):
        self.vocab_path = Path(vocab_path) if vocab_path else find_vocab(search_dirs)
        self._encoder = None
        self._ranks = None
        self._cache = {}

    def _load(self) -> None:
        if self.vocab_path is None or not self.vocab_path.is_file():
            raise ResourceError(
                f"a non-empty prompt needs the CLIP vocabulary {VOCAB_NAME}: put it in models/reconx, set "
                "RECONX_CLIP_BPE to its path, or `pip install open_clip_torch` (it ships the file); "
                "an empty prompt works without it")
        lines = gzip.open(self.vocab_path).read().decode("utf-8").split("\n")[1:NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        alphabet = list(_byte_alphabet().values())
        vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self._encoder = {tok: i for i, tok in enumerate(vocab)}
        self._ranks = {m: i for i, m in enumerate(merges)}

    def _bpe(self, word: str) -> List[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            # merge the lowest-ranked adjacent pair everywhere it occurs, until no known pair remains
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> List[int]:
        """BPE ids of one text, without SOT/EOT."""
        text = " ".join(html.unescape(html.unescape(text)).split()).strip().lower()
        if not text:
            return []
        if self._encoder is None and text in KNOWN_PROMPTS:
            return list(KNOWN_PROMPTS[text])
        if self._encoder is None:
            self._load()
        alphabet = _byte_alphabet()
        ids = []
        for piece in _PATTERN.findall(text):
            word = "".join(alphabet[b] for b in piece.encode("utf-8"))
            ids += [self._encoder[p] for p in self._bpe(word)]
        return ids

    def __call__(self, texts: Union[str, List[str]]) -> torch.Tensor:
        """texts: a string or list of B strings -> (B, 77) int64, truncated with EOT kept last."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), CONTEXT_LENGTH, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT] + self.encode(text) + [EOT]
            if len(ids) > CONTEXT_LENGTH:
                ids = ids[:CONTEXT_LENGTH - 1] + [EOT]
            out[row, :len(ids)] = torch.tensor(ids)
        return out
