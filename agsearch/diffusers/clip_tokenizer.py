"""The real CLIP BPE tokenizer (SD 1.5's), built offline from open-clip-torch's vocabulary file."""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path

CLIP_VOCAB_SIZE = 49408  # 256 bytes × 2 + 48894 merges + <|startoftext|>, <|endoftext|>


def clip_vocab_file() -> Path:
    """The BPE merges file shipped by open-clip-torch (found without importing the package)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("open-clip-torch is not installed; pass the path of bpe_simple_vocab_16e6.txt.gz")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=4)
def _tokenizer_dir(vocab_file: str) -> str:
    """vocab.json + merges.txt for CLIP's BPE, in a temporary folder (built once per process)."""
    lines = gzip.open(vocab_file).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    folder = Path(tempfile.mkdtemp(prefix="agsearch-clip-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    return str(folder)


def clip_tokenizer(vocab_file: str | Path | None = None, model_max_length: int = 77):
    """A real CLIP BPE tokenizer (pad = ``<|endoftext|>``, as in SD 1.5), built offline."""
    from transformers import CLIPTokenizer

    folder = _tokenizer_dir(str(vocab_file or clip_vocab_file()))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length, pad_token="<|endoftext|>")


