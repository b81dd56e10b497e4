"""Searching a token policy for the AR model: per-token gates and scales against full CFG.

The student guides token t with the relaxed logits

    ℓ_t = ℓ_u + (1 + g_t (s_t − 1)) (ℓ_c − ℓ_u),     g_t = σ(a_t) ∈ (0, 1),  s_t = 1 + softplus(b_t)

(g_t = 1: ``cfg`` at scale s_t; g_t = 0: ``cond``), the teacher is full CFG at scale s. The loss is
the sequence-level KL of the student's token distribution to the teacher's, by the chain rule

    KL(P_student ‖ P_teacher) = E_{x ~ student} Σ_t KL(p_student(· | x_<t) ‖ p_teacher(· | x_<t)),

estimated on the student's own rollouts, drawn with a straight-through Gumbel-softmax sampler:
the forward pass feeds the drawn token (one-hot) to the next position, the backward pass the
softmax's gradient, so a gate or scale at token t is also trained by what it does to the later
tokens (a teacher-forced KL along teacher sequences would train each token for itself, and a
scale could never learn to make up for the tokens that go unguided after the budget runs out).

The budget counts what the sampler pays (``agsearch.policy.token_nfe``): the unconditional stream
evaluates every position up to the last guided token. With independent gates its expectation is
Σ_t (1 − Π_{j ≥ t} (1 − g_j)) positions, differentiable; the loss adds
``penalty · relu(E[positions] − k) / 64`` with k = round((budget − 1) · 64). Export: cfg where
g_t > 0.5 (at scale s_t), cond elsewhere, then the latest guided tokens are turned to ``cond``
until the policy fits the budget.
"""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from agsearch.eval.digits import balanced_labels
from agsearch.models.digits.data import NULL_CLASS
from agsearch.models.digits_ar import SEQ_LEN, DigitsAR, load_model
from agsearch.policy import Policy, token_nfe


def budget_positions(budget: float) -> int:
    """Unconditional positions a budget of ``budget`` passes per token allows (k in [0, 64])."""
    if not (math.isfinite(budget) and 1.0 <= budget <= 2.0):
        raise ValueError(f"Expected a budget in [1, 2] passes per token, but got {budget}")
    return min(SEQ_LEN, math.floor((budget - 1.0) * SEQ_LEN + 1e-9))


def expected_positions(gates: torch.Tensor) -> torch.Tensor:
    """E[last guided token + 1] for independent Bernoulli gates (64,): Σ_t P(some gate ≥ t is on)."""
    none_after = torch.flip(torch.cumprod(torch.flip(1 - gates, [0]), 0), [0])  # Π_{j ≥ t} (1 − g_j)
    return (1 - none_after).sum()


class TokenPolicySearch(pl.LightningModule):
    """Gates a (64,) and scales b (64,) of a token policy (see the module docstring).

    Args:
        budget: passes per token, in [1, 2].
        guidance_scale: the teacher's CFG scale s (3: the base model's best by accuracy).
        batch_size: rollouts per step, balanced classes, fresh Gumbel noise each step (seeded).
        penalty: weight of the budget excess (in tokens / 64).
        lr: Adam on a and b.
        gumbel_tau: the Gumbel-softmax temperature of the backward pass.
        max_scale: s_t is clamped to [1, max_scale].
        weights: the frozen AR model (None: the built-in one).
    """

    def __init__(self, budget: float = 1.25, guidance_scale: float = 3.0, batch_size: int = 128,
                 penalty: float = 1.0, lr: float = 0.05, gumbel_tau: float = 1.0, max_scale: float = 8.0,
                 weights: str | None = None, seed: int = 0):
        super().__init__()
        if not (math.isfinite(guidance_scale) and 1.0 < guidance_scale <= max_scale):
            raise ValueError(f"Expected 1 < guidance_scale <= max_scale ({max_scale}), but got {guidance_scale}")
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1, but got {batch_size}")
        self.k = budget_positions(budget)
        self.save_hyperparameters()
        self.model: DigitsAR = load_model(weights)
        # Gates start on for the tokens the budget pays for and off after; scales at the teacher's.
        a = torch.full((SEQ_LEN,), -2.0)
        a[: self.k] = 2.0
        self.gate_logits = torch.nn.Parameter(a)
        self.scale_params = torch.nn.Parameter(torch.full((SEQ_LEN,), math.log(math.expm1(guidance_scale - 1.0))))
        self.generator = torch.Generator().manual_seed(seed)

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits)

    def scales(self) -> torch.Tensor:
        return (1.0 + F.softplus(self.scale_params)).clamp(max=self.hparams.max_scale)

    def rollout_kl(self, labels: torch.Tensor, hard_gates: bool = False) -> torch.Tensor:
        """Σ_t KL(student ‖ teacher) per rollout (B,), straight-through Gumbel rollouts of the student."""
        model, B = self.model, len(labels)
        g = (self.gates() > 0.5).float() if hard_gates else self.gates()
        w = 1.0 + g * (self.scales() - 1.0)  # (64,) the student's effective scale per token
        s = self.hparams.guidance_scale
        classes = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])  # one batch: cond rows, then uncond
        caches = [[] for _ in model.blocks]
        inputs = model.class_emb(classes)[:, None]
        total = labels.new_zeros(B, dtype=torch.float)
        for t in range(SEQ_LEN):
            lc, lu = model.step(inputs, t, caches).float().chunk(2)
            student = (lu + w[t] * (lc - lu)).log_softmax(-1)
            teacher = (lu + s * (lc - lu)).log_softmax(-1)
            total = total + (student.exp() * (student - teacher)).sum(-1)
            if t + 1 < SEQ_LEN:
                gumbel = -torch.log(-torch.log(torch.rand(student.shape, generator=self.generator)
                                               .clamp(1e-9, 1 - 1e-9))).to(student.device)
                soft = ((student + gumbel) / self.hparams.gumbel_tau).softmax(-1)
                hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
                onehot = hard + soft - soft.detach()  # straight through
                emb = onehot @ model.tok_emb.weight  # (B, C)
                inputs = emb.repeat(2, 1)[:, None]
        return total

    def training_step(self, batch, batch_idx):
        labels = balanced_labels(self.hparams.batch_size, self.device)
        kl = self.rollout_kl(labels).mean() / SEQ_LEN  # nats per token
        positions = expected_positions(self.gates())
        excess = F.relu(positions - self.k) / SEQ_LEN
        loss = kl + self.hparams.penalty * excess
        self.log_dict({"train/loss": loss, "train/kl_per_token": kl, "train/expected_positions": positions,
                       "train/budget_positions": float(self.k)}, prog_bar=True, batch_size=len(labels))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([self.gate_logits, self.scale_params], lr=self.hparams.lr)

    def train_dataloader(self):  # the rollouts are the data: one dummy item per step
        return torch.utils.data.DataLoader([0] * 10**6, batch_size=1)

    def export(self, name: str | None = None) -> Policy:
        """The discrete policy: cfg (at s_t) where g_t > 0.5, cond elsewhere, cut to the budget."""
        gates, scales = self.gates().detach().cpu(), self.scales().detach().cpu()
        steps = [{"op": "cfg", "scale": round(float(scales[t]), 4)} if gates[t] > 0.5 else {"op": "cond"}
                 for t in range(SEQ_LEN)]
        while token_nfe(steps) - SEQ_LEN > self.k:  # over budget: turn the latest guided token off
            last = max(t for t, st in enumerate(steps) if st["op"] == "cfg")
            steps[last] = {"op": "cond"}
        budget = self.hparams.budget
        return Policy.static(steps, self.hparams.guidance_scale, axis="tokens", name=name or f"searched-{budget:g}",
                             provenance={"model": "digits_ar", "search": {
                                 "space": "token_gates", "budget_passes_per_token": budget, "seed": self.hparams.seed,
                                 "gates": [round(float(v), 4) for v in gates]}})


def search_token_policy(budget: float, guidance_scale: float = 3.0, steps: int = 150, seed: int = 0,
                        logger=False, progress: bool = False, **kwargs) -> tuple[Policy, float, TokenPolicySearch]:
    """Run one search; (the exported policy, seconds, the module)."""
    pl.seed_everything(seed, verbose=False)
    module = TokenPolicySearch(budget, guidance_scale, seed=seed, **kwargs)
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="auto", devices=1, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                         log_every_n_steps=10, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module)
    seconds = time.perf_counter() - start
    policy = module.export()
    policy.provenance["search"].update(steps=steps, wall_seconds=round(seconds, 1))
    return policy, seconds, module


__all__ = ["TokenPolicySearch", "search_token_policy", "budget_positions", "expected_positions"]
