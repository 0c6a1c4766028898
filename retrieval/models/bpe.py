"""CLIP's byte-level BPE tokenizer without PyTorch: the token ids open_clip's ``SimpleTokenizer`` gives, as numpy.

Why a second copy of OpenAI's tokenizer (MIT licence, as open_clip carries it): open_clip's module imports
torch, and a cold ``clipdex search`` that runs an exported text tower (:mod:`clipdex.retrieval.models.onnx_runtime`)
must not pay for torch just to cut a query into tokens. The rules are the same line for line: ftfy and
double HTML unescaping, whitespace collapsed, lower case (open_clip's ``clean='lower'``, the only cleaning an
export accepts), the same regular expression, the same merges, ``[start] + tokens + [end]`` cut to the
context with the end marker kept. ``tests/test_bpe.py`` holds it to open_clip's ids on the world's captions
and on awkward text (unicode, markup, overlong).
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import numpy as np

MERGES = 49152 - 256 - 2  # merges CLIP's vocabulary uses (the file's first line is a header)
SPECIAL = ("<start_of_text>", "<end_of_text>")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """Each byte as a printable character (the reversible map BPE works on)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clean_lower(text: str) -> str:
    """open_clip's ``clean='lower'``: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipBpeTokenizer:
    """CLIP's tokenizer from its merges file (``bpe_simple_vocab_16e6.txt.gz``): :meth:`__call__` gives
    (B, context) int64 ids, zero-padded, as open_clip's ``SimpleTokenizer(clean='lower')`` does."""

    def __init__(self, merges_file: str | Path, *, context_length: int = 77):
        import regex

        lines = gzip.open(merges_file).read().decode("utf-8").split("\n")[1: MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        byte_chars = list(_bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(SPECIAL)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {t: t for t in SPECIAL}
        self.pattern = regex.compile("|".join(SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self.sot, self.eot = self.encoder[SPECIAL[0]], self.encoder[SPECIAL[1]]
        self.context_length = context_length
        self.vocab_size = len(vocab)

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """The BPE ids of ``text``, without the start and end markers and not cut to the context."""
        byte_chars = _bytes_to_unicode()
        ids = []
        for token in self.pattern.findall(clean_lower(text)):
            token = "".join(byte_chars[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token).split(" "))
        return ids

    def token_count(self, text: str) -> int:
        """Tokens ``text`` takes before it is cut to the context, start and end markers included."""
        return len(self.encode(text)) + 2

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        """(B, context_length) int64 token ids: start, tokens, end (kept last when cut), zeros after."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.context_length), np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            out[i, : len(ids)] = ids
        return out


__all__ = ["ClipBpeTokenizer", "clean_lower"]
