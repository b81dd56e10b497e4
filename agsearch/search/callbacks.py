"""Watching the gates: a history file every run writes, and Weights & Biases panels.

``GateMonitor`` records, at the end of every training epoch, the gate probabilities (T, K), the
expected NFE, λ, the temperature and the latest losses. It writes them to ``gates.json`` in the
run directory (whatever the logger; the notebook reads it), draws ``gates.png``, and for every
``WandbLogger`` of the trainer logs the heatmap as an image and the probabilities as a table.
``ThresholdMonitor`` does the same for an adaptive space's search (``agsearch.search.thresholds``):
the per-step thresholds θ_t over the teacher's γ_t, and the share of samples still guided per step
(``thresholds.json``, ``thresholds.png``; W&B ``thresholds/curve`` image and ``thresholds/table``).
``log_policy_artifact`` adds the exported policy file to the W&B run as an artifact.
``progress_bar`` is Lightning's default bar, naming the last epoch of a run limited by steps.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

from agsearch.io import atomic_write_bytes, atomic_write_text

HISTORY_FILE = "gates.json"
THRESHOLDS_FILE = "thresholds.json"


class StepLimitedProgressBar(RichProgressBar):
    """Lightning's rich bar, naming the last epoch of a run limited by ``max_steps`` ("Epoch 1/2",
    where Lightning writes "Epoch 1/-2": its ``max_epochs`` is -1 then)."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        trainer = self.trainer
        batches = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps > 0 and 0 < batches < math.inf:
            steps_per_epoch = max(1, batches // trainer.accumulate_grad_batches)
            last = math.ceil(trainer.max_steps / steps_per_epoch) - 1
            description = description.replace(f"{current_epoch}/-2", f"{current_epoch}/{last}", 1)
        return description


def progress_bar() -> pl.Callback:
    """The bar Lightning would pick: ``StepLimitedProgressBar`` where rich is installed, else tqdm's."""
    return StepLimitedProgressBar() if importlib.util.find_spec("rich") is not None else TQDMProgressBar()


def _wandb_loggers(trainer: pl.Trainer) -> list:
    from pytorch_lightning.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def plot_gates(probs: torch.Tensor, labels: list[str], title: str = "", picks: list[int] | None = None):
    """A steps × ops heatmap of gate probabilities (a matplotlib figure); ``picks`` marks the
    discretised op of every step."""
    import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg by itself

    p = probs.detach().float().cpu().numpy().T  # (K, T)
    K, T = p.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * T + 2), 0.45 * K + 1.6))
    im = ax.imshow(p, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(K), labels)
    ax.set_xticks(range(0, T, max(1, T // 12)))
    ax.set_xlabel("sampling step (0 = most noisy)")
    if picks is not None:
        ax.scatter(range(T), picks, marker="x", color="red", s=24, label="discretised")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.02, label="probability")
    fig.tight_layout()
    return fig


def _figure_png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


class _History(pl.Callback):
    """A run directory and a list of per-epoch entries that travels in the checkpoint."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


class GateMonitor(_History):
    """Per-epoch gate history (``gates.json``, ``gates.png``) and W&B heatmap + table."""

    def on_train_epoch_end(self, trainer: pl.Trainer, module) -> None:
        probs = module.gate_probabilities()
        labels = module.space.labels(module.candidates)
        metrics = {k: round(float(v), 8) for k, v in trainer.callback_metrics.items()
                   if k.startswith(("train/", "val/")) and torch.as_tensor(v).numel() == 1}
        picks = module.discrete_indices()
        entry = {
            "epoch": trainer.current_epoch, "step": trainer.global_step,
            "expected_nfe": round(float(module.expected_nfe().detach()), 4), "dual": round(float(module.dual), 6),
            "temperature": round(float(module.temperature()), 6), "metrics": metrics,
            "discrete": picks, "probs": [[round(float(x), 5) for x in row] for row in probs],
        }
        self.history.append(entry)
        if not trainer.is_global_zero:
            return
        self.write(module)
        title = (f"{module.space.name}, epoch {entry['epoch']}, step {entry['step']}: "
                 f"E[NFE] {entry['expected_nfe']:.2f}, budget {module.hparams.budget}")
        png = _figure_png(plot_gates(probs, labels, title, picks))
        atomic_write_bytes(self.run_dir / "gates.png", png)
        for logger in _wandb_loggers(trainer):
            import io

            import wandb
            from PIL import Image

            logger.log_image(key="gates/heatmap", images=[wandb.Image(Image.open(io.BytesIO(png)), caption=title)])
            rows = [[t, *[float(x) for x in row], labels[picks[t]]] for t, row in enumerate(entry["probs"])]
            logger.log_table(key="gates/table", columns=["step", *labels, "discretised"], data=rows)
            logger.log_metrics({"gates/expected_nfe": entry["expected_nfe"], "gates/temperature": entry["temperature"],
                                "gates/dual": entry["dual"], "epoch": entry["epoch"]}, step=trainer.global_step)

    def write(self, module) -> Path:
        document = {
            "format": "agsearch.gates", "version": 1,
            "space": module.space.name, "ops": module.space.labels(module.candidates),
            "costs": module.costs, "budget": int(module.hparams.budget),
            "num_inference_steps": module.num_inference_steps, "guidance_scale": module.guidance_scale,
            "epochs": self.history,
        }
        return atomic_write_text(self.run_dir / HISTORY_FILE, json.dumps(document) + "\n")


def plot_thresholds(thresholds: list[float], guided: list[float], gamma_quantiles: list[list[float]] | None = None,
                    title: str = "", stop_scales: list[float] | None = None, guidance_scale: float | None = None):
    """θ_t per step over the teacher's γ_t (5/50/95% quantiles), the share still guided, and the
    stop scales (when the rule has them) against the guided scale."""
    import matplotlib.pyplot as plt

    T = len(thresholds)
    steps = list(range(T))
    rows = 3 if stop_scales is not None else 2
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, 0.3 * T + 2), 2.6 * rows), sharex=True)
    ax, bx = axes[0], axes[1]

    def nines(c):  # −log10(1 − c): 0.9 → 1, 0.99 → 2; cosines crowd near 1
        import math
        return -math.log10(max(1e-7, 1 - min(max(c, -1.0), 1.0)))

    if gamma_quantiles is not None:
        lo, mid, hi = ([nines(q[j]) for q in gamma_quantiles] for j in range(3))
        ax.fill_between(steps, lo, hi, color="tab:blue", alpha=0.2, label="teacher γ_t, 5–95%")
        ax.plot(steps, mid, color="tab:blue", lw=1, label="teacher γ_t, median")
    ax.plot(steps[:-1], [nines(v) for v in thresholds[:-1]], color="tab:red", marker="o", ms=3, label="θ_t")
    ax.set_ylabel("−log10(1 − cos)")
    ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    ax.set_title(title, fontsize=9)
    bx.step(steps, guided, where="mid", color="tab:green")
    bx.set_ylim(0, 1.02)
    bx.set_ylabel("share guided")
    if stop_scales is not None:
        cx = axes[2]
        cx.plot(steps[:-1], stop_scales[:-1], color="tab:purple", marker="o", ms=3, label="stop scale")
        if guidance_scale is not None:
            cx.axhline(guidance_scale, color="grey", lw=1, ls="--", label=f"guided scale w = {guidance_scale:g}")
        cx.set_ylabel("scale at the stop")
        cx.legend(fontsize=7, loc="upper left", framealpha=0.6)
    axes[-1].set_xlabel("sampling step (0 = most noisy)")
    fig.tight_layout()
    return fig


class ThresholdMonitor(_History):
    """θ_t history (``thresholds.json``, ``thresholds.png``) and W&B curve + table, at the end of
    every epoch (about 20 times per run when epochs are many)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, module) -> None:
        # A full-batch threshold search has one step per epoch and hundreds of epochs: keep about
        # 20 entries (and the last), not a plot per step.
        epochs = trainer.max_steps / max(1, trainer.num_training_batches) if trainer.max_steps and trainer.max_steps > 0 else 0
        every = max(1, round(epochs / 20))
        last = trainer.max_steps and trainer.global_step >= trainer.max_steps
        if trainer.current_epoch % every and not last:
            return
        metrics = {k: round(float(v), 8) for k, v in trainer.callback_metrics.items()
                   if k.startswith(("train/", "val/")) and torch.as_tensor(v).numel() == 1}
        entry = {
            "epoch": trainer.current_epoch, "step": trainer.global_step, "dual": round(float(module.dual), 6),
            "temperature": round(float(module.temperature()), 6), "metrics": metrics,
            "thresholds": [round(v, 8) for v in module.thresholds()],
            "guided": [round(float(v), 5) for v in module.last_guided],
        }
        stop_scales = module.stop_scales()
        if stop_scales is not None:
            entry["stop_scales"] = stop_scales
        self.history.append(entry)
        if not trainer.is_global_zero:
            return
        self.write(module)
        e_nfe = metrics.get("train/expected_nfe", float("nan"))
        title = (f"{module.space.name}, epoch {entry['epoch']}, step {entry['step']}: "
                 f"E[NFE] {e_nfe:.2f}, budget {module.hparams.budget} (before calibration)")
        png = _figure_png(plot_thresholds(entry["thresholds"], entry["guided"], module.gamma_quantiles(), title,
                                          stop_scales, module.guidance_scale))
        atomic_write_bytes(self.run_dir / "thresholds.png", png)
        for logger in _wandb_loggers(trainer):
            import io

            import wandb
            from PIL import Image

            logger.log_image(key="thresholds/curve", images=[wandb.Image(Image.open(io.BytesIO(png)), caption=title)])
            columns = ["step", "theta", "guided_share"] + (["stop_scale"] if stop_scales is not None else [])
            rows = [[t, th, g, *([stop_scales[t]] if stop_scales is not None else [])]
                    for t, (th, g) in enumerate(zip(entry["thresholds"], entry["guided"]))]
            logger.log_table(key="thresholds/table", columns=columns, data=rows)
            logger.log_metrics({"thresholds/temperature": entry["temperature"], "thresholds/dual": entry["dual"],
                                "epoch": entry["epoch"]}, step=trainer.global_step)

    def write(self, module) -> Path:
        document = {
            "format": "agsearch.thresholds", "version": 1, "space": module.space.name,
            "rule": dict(module.space.rule), "budget": int(module.hparams.budget),
            "num_inference_steps": module.num_inference_steps, "guidance_scale": module.guidance_scale,
            "gamma_quantiles": module.gamma_quantiles(), "epochs": self.history,
        }
        return atomic_write_text(self.run_dir / THRESHOLDS_FILE, json.dumps(document) + "\n")


def log_policy_artifact(trainer: pl.Trainer, path: Path, name: str, records: list[dict] | None = None) -> None:
    """Log the exported policy file as a W&B artifact (type ``policy``) and the comparison table."""
    for logger in _wandb_loggers(trainer):
        import wandb

        artifact = wandb.Artifact(name=name, type="policy", metadata={"file": Path(path).name})
        artifact.add_file(str(path))
        logger.experiment.log_artifact(artifact)
        if records:
            columns = list(records[0].keys())
            logger.log_table(key="eval/comparison", columns=columns, data=[[r[c] for c in columns] for r in records])
