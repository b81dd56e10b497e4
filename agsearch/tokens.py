"""Guidance policies over the token positions of the built-in AR model.

CFG on an autoregressive model guides every token's logits, ℓ = ℓ_u + s (ℓ_c − ℓ_u), and pays a
second forward pass per token for ℓ_u. A token policy (``Policy`` with ``axis="tokens"``, one
step per token) says where to pay it:

- **static**: ``cfg`` (with its own ``scale``) or ``cond`` at each token, the same for every
  sample;
- **adaptive** (``token_divergence``): per sample, CFG until a divergence between the conditional
  and unconditional next-token distributions has stayed below a threshold for ``patience``
  consecutive tokens (counted from token ``warmup`` on), then ``cond`` for good. ``kl`` is KL(p_c ‖ p_u) in nats; ``cosine`` is
  1 − cos of the centred logits (logits are defined up to a constant, hence the centring).

**The unconditional stream's key/value cache stays exact.** Each stream (conditional, with the
class token; unconditional, with the null class) keeps a cache of the keys and values of every
position it has seen. A stream that skips positions and resumes later first computes the skipped
positions in one multi-position pass (``DigitsAR.step`` with n > 1), so ℓ_u at a resumed token is
exactly the unconditional model's; those positions count as passes. A static policy therefore
pays for every position up to its last ``cfg`` token (``agsearch.policy.token_nfe``): skipping
tokens in the middle of the guided stretch saves nothing. The adaptive rule is one-way (a stopped
sample's rows leave the unconditional batch and never come back), so it pays only for the tokens
it guides.

Passes are counted per sample as forward evaluations of a token position: the conditional stream's
64 plus the unconditional stream's. ``passes per token`` = that count / 64, from 1 (no guidance)
to 2 (CFG at every token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agsearch.guidance.ops import cfg
from agsearch.models.digits.data import NULL_CLASS
from agsearch.models.digits_ar import SEQ_LEN, DigitsAR, _draw, check_sampling, sample_uniforms
from agsearch.policy import Policy, PolicyError

MEASURES = ("kl", "cosine")


def divergence(lc: torch.Tensor, lu: torch.Tensor, measure: str) -> torch.Tensor:
    """Per-row divergence (B,) of the conditional and unconditional next-token distributions.

    ``kl``: KL(p_c ‖ p_u) = Σ p_c (log p_c − log p_u), nats. ``cosine``: 1 − cos(ℓ_c − mean ℓ_c,
    ℓ_u − mean ℓ_u), in [0, 2]; 0 when the logits agree up to a constant and a positive factor.
    """
    lc, lu = lc.float(), lu.float()
    if measure == "kl":
        log_c, log_u = lc.log_softmax(-1), lu.log_softmax(-1)
        return (log_c.exp() * (log_c - log_u)).sum(-1)
    if measure == "cosine":
        a, b = lc - lc.mean(-1, keepdim=True), lu - lu.mean(-1, keepdim=True)
        return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
    raise ValueError(f"unknown divergence {measure!r}; expected one of {MEASURES}")


@dataclass
class TokenRun:
    """What a policy run produced: ``tokens`` (B, 64); ``uncond_passes`` (B,), the unconditional
    stream's evaluated positions per sample; ``stops`` (B,), for an adaptive rule the token at
    which each sample stopped guiding (64: never), else ``None``."""

    tokens: torch.Tensor
    uncond_passes: torch.Tensor
    stops: torch.Tensor | None = None

    @property
    def passes(self) -> torch.Tensor:
        """Forward passes per sample: 64 conditional + the unconditional stream's."""
        return SEQ_LEN + self.uncond_passes

    @property
    def passes_per_token(self) -> float:
        return float(self.passes.float().mean()) / SEQ_LEN


def check_token_policy(policy: Policy) -> Policy:
    """The policy, if it can run on the AR model: over tokens, one step per token. PolicyError otherwise."""
    return policy.for_steps(SEQ_LEN, axis="tokens")


def _inputs(model: DigitsAR, classes: torch.Tensor, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Input embeddings (B, stop − start, C) of positions start … stop − 1: position 0 is the class
    token, position q > 0 the token drawn at q − 1."""
    parts = []
    if start == 0:
        parts.append(model.class_emb(classes)[:, None])
        start = 1
    if stop > start:
        parts.append(model.tok_emb(tokens[:, start - 1: stop - 1]))
    return torch.cat(parts, 1)


def _keep_rows(caches: list[list], keep: torch.Tensor) -> None:
    """Drop the rows not in ``keep`` (indices) from every layer's cached keys and values, in place."""
    for cache in caches:
        if cache:
            cache[:] = [t.index_select(0, keep) for t in cache]


@torch.no_grad()
def generate_with_policy(model: DigitsAR, labels: torch.Tensor, seeds: list[int], policy: Policy,
                         temperature: float = 1.0, top_k: int | None = None) -> TokenRun:
    """Sample (B, 64) token sequences for ``labels`` under a token policy, skipping the unconditional
    passes it does not need. Uses the uniforms of ``agsearch.models.digits_ar.generate`` (one
    generator per sample, seeded with ``seeds[i]``), so a full-CFG policy draws its tokens.
    """
    policy = check_token_policy(policy)
    check_sampling(labels, seeds, temperature, top_k)
    device = next(model.parameters()).device
    labels = labels.to(device)
    B = len(labels)
    u = sample_uniforms(seeds, device)
    null = torch.full_like(labels, NULL_CLASS)
    tokens = torch.zeros(B, SEQ_LEN, dtype=torch.long, device=device)
    cond_caches = [[] for _ in model.blocks]
    uncond_caches = [[] for _ in model.blocks]
    uncond_passes = torch.zeros(B, dtype=torch.long, device=device)
    adaptive = policy.kind == "adaptive"
    if adaptive:
        rule = policy.rule
        measure, threshold, patience = rule["measure"], float(rule["threshold"]), int(rule.get("patience", 1))
        warmup = int(rule.get("warmup", 0))
        active = torch.arange(B, device=device)  # the samples still guided: their rows of the uncond stream
        streak = torch.zeros(B, dtype=torch.long, device=device)
        stops = torch.full((B,), SEQ_LEN, dtype=torch.long, device=device)
    computed = 0  # static: positions the (whole-batch) unconditional stream has evaluated
    for t in range(SEQ_LEN):
        lc = model.step(_inputs(model, labels, tokens, t, t + 1), t, cond_caches)  # (B, V)
        logits = lc
        scale = policy.scale_at(t)
        if not adaptive and policy.steps[t]["op"] == "cfg":
            # Catch up on the positions skipped since the stream last ran, then position t.
            lu = model.step(_inputs(model, null, tokens, computed, t + 1), computed, uncond_caches)
            uncond_passes += t + 1 - computed
            computed = t + 1
            logits = cfg(lc, lu, scale)
        elif adaptive and len(active):
            lu = model.step(_inputs(model, null[active], tokens[active], t, t + 1), t, uncond_caches)
            uncond_passes[active] += 1
            logits = lc.clone()
            logits[active] = cfg(lc[active], lu, scale)
            below = (divergence(lc[active], lu, measure) < threshold) & (t >= warmup)
            streak[active] = torch.where(below, streak[active] + 1, 0)
            done = streak[active] >= patience
            if done.any():  # guided at t (both passes ran), cond from t + 1 on
                stops[active[done]] = t + 1
                keep = (~done).nonzero().squeeze(1)
                _keep_rows(uncond_caches, keep)
                active = active[keep]
        tokens[:, t] = _draw(logits, u[:, t], temperature, top_k)
    return TokenRun(tokens, uncond_passes, stops if adaptive else None)


def cutoff_policy(k: int, scale: float, name: str | None = None) -> Policy:
    """CFG at scale ``scale`` on the first ``k`` tokens, then ``cond``: 1 + k/64 passes per token."""
    if not 0 <= k <= SEQ_LEN:
        raise PolicyError(f"a token cutoff must be in [0, {SEQ_LEN}], got {k}")
    return Policy.static(["cfg"] * k + ["cond"] * (SEQ_LEN - k), scale, axis="tokens",
                         name=name or f"cutoff-{k}")


def adaptive_policy(measure: str, threshold: float, scale: float, patience: int = 1, warmup: int = 0,
                    name: str | None = None) -> Policy:
    """The per-sample divergence rule (see the module docstring)."""
    rule = {"rule": "token_divergence", "measure": measure, "threshold": float(threshold), "patience": int(patience),
            "warmup": int(warmup)}
    return Policy("adaptive", SEQ_LEN, scale, rule=rule, axis="tokens", name=name)


__all__ = ["divergence", "TokenRun", "generate_with_policy", "check_token_policy", "cutoff_policy",
           "adaptive_policy", "MEASURES"]
