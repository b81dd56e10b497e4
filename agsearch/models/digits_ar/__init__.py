"""The built-in autoregressive (AR) digits model: a small class-conditional transformer.

An 8×8 digit is a sequence of 64 tokens, its grey levels 0–16 in raster order (the dataset's own
integers, no tokenizer). The sequence is prefixed by a class token: one of the 10 digits or the
null class ``NULL_CLASS`` (10), which training substitutes for ~10% of the labels so that the same
network also models p(x) and classifier-free guidance works on its logits (Ho & Salimans 2022):

    ℓ_cfg = ℓ_u + s (ℓ_c − ℓ_u),      ℓ_c = logits(x_<t | c),  ℓ_u = logits(x_<t | ∅)

s = 1 is guidance-free sampling (1 forward pass per token); any other s costs 2 (both passes run
as one batch). CCA (``agsearch.cca``) fine-tunes this model so that s = 1 is as good as CFG.

Sampling draws token t of sample i by inverse-CDF from one uniform of a per-sample generator seeded
with ``seeds[i]``, so sample i does not depend on the batch and every compared run (base, CFG, CCA,
any scale) shares its randomness. A key/value cache makes sampling O(T) instead of O(T²) in forward
work (``experiments/train_digits_ar.py`` measures it; see the model card).

Trained by ``experiments/train_digits_ar.py``; weights ``weights/digits_ar.safetensors`` with
``weights/digits_ar.json`` (config) and ``weights/DIGITS_AR_CARD.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from agsearch.guidance.ops import cfg
from agsearch.models.digits.data import MAX_PIXEL, NULL_CLASS, NUM_CLASSES

WEIGHTS_DIR = Path(__file__).parent / "weights"

SEQ_LEN = 64  # 8×8 pixels, raster order
VOCAB = MAX_PIXEL + 1  # grey levels 0–16


@dataclass
class DigitsARConfig:
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.1  # residual/attention dropout in training; the data set is tiny (1,437 images)
    vocab_size: int = VOCAB
    num_classes: int = NUM_CLASSES  # + 1 embedding for the null class
    seq_len: int = SEQ_LEN


class _Block(nn.Module):
    """Pre-norm transformer block; attention with an optional key/value cache."""

    def __init__(self, cfg: DigitsARConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        mask, causal = None, cache is None or not cache  # no cache, or a prefix into an empty one
        if cache is not None:
            if cache:  # append to the keys/values of the earlier positions
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
                if T > 1:  # T new positions after S − T cached ones: query j sees keys ≤ S − T + j
                    S = k.shape[2]
                    mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            cache[:] = [k, v]
        # A single new query (T = 1) sees every cached position: no mask.
        causal = causal and T > 1
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + F.dropout(self.proj(y), drop, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), drop, self.training)


class DigitsAR(nn.Module):
    """p(x | c) = Π_t p(x_t | x_<t, c) over 64 grey-level tokens; c ∈ {0…9, NULL_CLASS}."""

    def __init__(self, config: DigitsARConfig | None = None):
        super().__init__()
        self.config = cfg = config or DigitsARConfig()
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.d_model)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, 64, V): position t predicts token t from the class and tokens < t."""
        x = torch.cat([self.class_emb(labels)[:, None], self.tok_emb(tokens[:, : self.config.seq_len - 1])], 1)
        x = F.dropout(x + self.pos_emb[:, : x.shape[1]], self.config.dropout, self.training)  # (B, 64, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def step(self, inputs: torch.Tensor, pos: int, caches: list[list]) -> torch.Tensor:
        """Incremental forward: embeddings ``inputs`` (B, n, C) at positions ``pos`` … ``pos + n − 1``,
        after the ``pos`` positions in ``caches`` → the logits at the last of them (B, V)."""
        x = inputs + self.pos_emb[:, pos: pos + inputs.shape[1]]
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self.head(self.ln_f(x))[:, -1]

    def log_likelihood(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(x | c) summed over the 64 tokens, (B,)."""
        logp = self(tokens, labels).log_softmax(-1)  # (B, 64, V)
        return logp.gather(2, tokens[:, :, None]).squeeze(2).sum(1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def tokens_to_images(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 64) grey levels → (B, 1, 8, 8) images in [-1, 1] (the classifier's input space)."""
    return tokens.float().view(-1, 1, 8, 8) / (MAX_PIXEL / 2) - 1.0


def images_to_tokens(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) images in [-1, 1] from ``load_digits_tensors`` → (B, 64) integer tokens 0–16."""
    return ((images.flatten(1) + 1.0) * (MAX_PIXEL / 2)).round().long().clamp(0, MAX_PIXEL)


def sample_uniforms(seeds: list[int], device="cpu") -> torch.Tensor:
    """One uniform per token for each sample, (B, 64), from a generator seeded with ``seeds[i]``."""
    return torch.stack([torch.rand(SEQ_LEN, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


def _draw(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Inverse-CDF draw from softmax(logits / temperature) restricted to the top k; logits (B, V), u (B,)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=logits.shape[-1] - 1)


def check_sampling(labels: torch.Tensor, seeds: list[int], temperature: float, top_k: int | None) -> None:
    """ValueError unless the sampling settings are usable: temperature > 0, top_k ≥ 1 or None, a seed per label."""
    if temperature <= 0:
        raise ValueError(f"Expected temperature > 0, but got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"Expected top_k >= 1 or None, but got {top_k}")
    if len(seeds) != len(labels):
        raise ValueError(f"got {len(seeds)} seeds for {len(labels)} labels")


@torch.no_grad()
def generate(model: DigitsAR, labels: torch.Tensor, seeds: list[int], guidance_scale: float = 1.0,
             temperature: float = 1.0, top_k: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Sample token sequences (B, 64) for class ``labels`` (B,), guidance-free (s = 1) or with CFG.

    CFG on logits, ℓ_u + s (ℓ_c − ℓ_u), with the conditional and unconditional passes in one batch
    (2 forward passes per token); s = 1 runs the conditional pass only (1 per token).
    """
    check_sampling(labels, seeds, temperature, top_k)
    device = next(model.parameters()).device
    labels = labels.to(device)
    u = sample_uniforms(seeds, device)
    guided = guidance_scale != 1.0
    B = len(labels)
    cond = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if guided else labels  # (B or 2B,)
    tokens = torch.zeros(B, SEQ_LEN, dtype=torch.long, device=device)
    caches = [[] for _ in model.blocks]
    for t in range(SEQ_LEN):
        if use_cache:
            inputs = model.class_emb(cond)[:, None] if t == 0 else model.tok_emb(tokens[:, t - 1]).repeat(1 + guided, 1)[:, None]
            logits = model.step(inputs, t, caches)  # (B or 2B, V)
        else:  # recompute the whole prefix (the reference the cache is checked against)
            logits = model(tokens.repeat(1 + guided, 1), cond)[:, t]
        if guided:
            lc, lu = logits.chunk(2)
            logits = cfg(lc, lu, guidance_scale)
        tokens[:, t] = _draw(logits, u[:, t], temperature, top_k)
    return tokens


def nfe_per_token(guidance_scale: float) -> int:
    """Forward passes per token: 1 without guidance (s = 1), 2 with CFG."""
    return 1 if guidance_scale == 1.0 else 2


def save_model(model: DigitsAR, path: str | Path) -> None:
    """Weights as safetensors plus the config as JSON beside them (``<stem>.json``), atomically."""
    from safetensors.torch import save

    from agsearch.io import atomic_write_bytes, atomic_write_text

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))
    atomic_write_text(path.with_suffix(".json"), json.dumps(asdict(model.config), indent=2) + "\n")


def load_model(path: str | Path | None = None) -> DigitsAR:
    """A DigitsAR from safetensors (default: the built-in one), frozen, in eval mode.

    The config is read from ``<stem>.json`` beside the weights when present; weights that do not
    match the model raise ``ValueError`` naming the file and the first mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path) if path else WEIGHTS_DIR / "digits_ar.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"AR weights not found at {path}; train them with experiments/train_digits_ar.py")
    config_path = path.with_suffix(".json")
    config = DigitsARConfig()
    if config_path.is_file():
        try:
            config = DigitsARConfig(**json.loads(config_path.read_text()))
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_path}: not a DigitsAR config ({e})") from None
    model = DigitsAR(config)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise ValueError(f"{path} does not match the DigitsAR model: missing tensor {name!r}")
        if state[name].shape != tensor.shape:
            raise ValueError(f"{path} does not match the DigitsAR model: {name} has shape "
                             f"{tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{path} does not match the DigitsAR model: unexpected tensor {extra[0]!r}")
    model.load_state_dict(state)
    return model.requires_grad_(False).eval()
