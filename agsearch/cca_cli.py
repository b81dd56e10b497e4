"""``agsearch cca``: CCA fine-tuning of the built-in AR digits model (LightningCLI), then evaluation.

With no arguments it runs the default fine-tune (``experiments/cca.yaml`` spells it out), writes
into ``--out DIR`` (default ``runs/cca/<time>``):

    digits_ar_cca.safetensors (+ .json config)   the fine-tuned weights
    results.json      rows {name, guidance_scale, nfe_per_token, accuracy, fd, ...}: the base model
                      without guidance, the base with its best CFG (of ``--eval.scales``), CCA
                      without guidance and CCA with CFG at that scale, on held-out seeds
    results.md        the same as a markdown table
    config.yaml, wandb/ (offline run: train/loss, train/pos_log_ratio, train/neg_log_ratio,
                      train/pos_gt_neg), checkpoints/last.ckpt (the trainable copy only)

``--config FILE`` and dotted overrides (``--model.lam=300``, ``--trainer.max_steps=100``) work as
in any LightningCLI.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Literal, Optional

DEFAULT_ROOT = "runs/cca"
TRAINER_DEFAULTS = {
    "max_steps": 80,  # ~3.6 epochs of the 1,437 training digits at batch 64
    "max_epochs": -1,
    "accelerator": "auto",
    "devices": 1,
    "log_every_n_steps": 5,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "enable_checkpointing": False,  # we add our own ModelCheckpoint into the run directory
}
DEFAULT_SCALES = [1.5, 2.0, 3.0, 4.0]


class CCAInputError(ValueError):
    """A configuration the user can fix (one line, exit code 2)."""


def _cli_class():
    from pytorch_lightning.cli import LightningCLI

    from agsearch.cca import CCAModule, DigitsTokens

    class CCACLI(LightningCLI):
        def __init__(self, args):
            super().__init__(
                CCAModule, DigitsTokens, args=args, run=False, trainer_defaults=TRAINER_DEFAULTS,
                seed_everything_default=0, save_config_kwargs={"overwrite": True},
                parser_kwargs={"exit_on_error": False, "prog": "agsearch cca",
                               "description": "CCA fine-tuning of the built-in AR digits model, then evaluation."},
            )

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--out", type=Optional[str], default=None,
                                help="output directory (default: runs/cca/<time>)")
            parser.add_argument("--eval.samples", type=int, default=1000, help="held-out samples per row (0: skip)")
            parser.add_argument("--eval.seed", type=int, default=1, help="held-out seed: sample i uses seed*10^6+i")
            parser.add_argument("--eval.batch_size", type=int, default=1000)
            parser.add_argument("--eval.scales", type=list[float], default=DEFAULT_SCALES,
                                help="CFG scales swept for the base model's best CFG")
            parser.add_argument("--wandb.mode", type=Literal["offline", "online", "disabled"], default="offline")
            parser.add_argument("--wandb.project", type=str, default="agsearch")
            parser.add_argument("--progress", type=bool, default=True)

        def before_instantiate_classes(self) -> None:
            config = self.config
            out = Path(config.out) if config.out else Path(DEFAULT_ROOT) / time.strftime("%Y%m%d-%H%M%S")
            if out.exists() and not out.is_dir():
                raise CCAInputError(f"--out {out} is a file; give a directory")
            if config.eval.samples < 0 or config.eval.samples == 1:
                raise CCAInputError(f"Expected eval.samples to be 0 (skip) or at least 2, but got {config.eval.samples}")
            if config.eval.batch_size < 1:
                raise CCAInputError(f"Expected eval.batch_size >= 1, but got {config.eval.batch_size}")
            if not config.eval.scales or any(s <= 0 for s in config.eval.scales):
                raise CCAInputError(f"Expected eval.scales to be positive guidance scales, but got {config.eval.scales}")
            out.mkdir(parents=True, exist_ok=True)
            self.run_dir = out

        def instantiate_trainer(self, **kwargs):
            from pytorch_lightning.callbacks import ModelCheckpoint

            config = self.config
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            trainer_config["default_root_dir"] = str(self.run_dir)
            trainer_config["enable_progress_bar"] = bool(config.progress)
            trainer_config["enable_checkpointing"] = True
            if trainer_config.get("logger") in (None, True):
                trainer_config["logger"] = default_logger(self.run_dir, config.wandb.mode, config.wandb.project)
            extra.append(ModelCheckpoint(dirpath=self.run_dir / "checkpoints", filename="last", save_top_k=1,
                                         enable_version_counter=False))
            return self._instantiate_trainer(trainer_config, extra)

    return CCACLI


def default_logger(run_dir: Path, mode: str = "offline", project: str = "agsearch"):
    """W&B (offline by default: no login, never blocks) or, with mode 'disabled', a CSV logger."""
    if mode == "disabled":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="", version="")
    import os

    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(save_dir=str(run_dir), project=project, name=f"cca-{run_dir.name}",
                       offline=mode == "offline", log_model=False)


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    text = "; ".join(lines[:3]) if lines else "invalid arguments"
    return text if len(text) < 400 else text[:397] + "..."


def build_cli(argv: list[str]):
    """Parse ``argv`` and instantiate module, data and trainer (raises CCAInputError)."""
    from jsonargparse import ArgumentError

    for name in ("lightning_fabric.utilities.seed", "pytorch_lightning.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it also sees a command line
    try:
        return _cli_class()(argv)
    except (ArgumentError, ValueError, FileNotFoundError) as e:  # bad β, λ, null ratio, reference
        raise CCAInputError(_one_line(str(e))) from None
    finally:
        sys.argv = saved


def evaluate_run(base, tuned, samples: int, seed: int, batch_size: int, scales, device="cpu") -> list[dict]:
    """Rows: base without guidance, base with its best CFG, CCA without guidance, CCA with that CFG."""
    from agsearch.cca import ARDigitsEvaluator, best_cfg

    evaluator = ARDigitsEvaluator(samples, seed, batch_size, device)
    best, _ = best_cfg(evaluator, base, scales)
    best["name"] = f"base + best CFG (of s in {list(scales)})"
    return [evaluator.evaluate(base, "base, no guidance"), best,
            evaluator.evaluate(tuned, "CCA, no guidance"),
            evaluator.evaluate(tuned, "CCA + CFG", best["guidance_scale"])]


def run_cca(argv: list[str]) -> tuple[Path, list[dict], float]:
    """Fit, save the weights, evaluate. Returns (output directory, rows, fine-tune seconds)."""
    from agsearch.models.digits_ar import save_model
    from agsearch.policy import atomic_write_text

    import warnings

    cli = build_cli(argv)
    trainer, module, config = cli.trainer, cli.model, cli.config
    # The frozen reference is in eval mode on purpose (no dropout): not worth a warning.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    print(f"agsearch cca: output directory {cli.run_dir}", file=sys.stderr)
    start = time.perf_counter()
    trainer.fit(module, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise KeyboardInterrupt
    tuned = module.model.eval()
    save_model(tuned, cli.run_dir / "digits_ar_cca.safetensors")
    rows: list[dict] = []
    if config.eval.samples:
        rows = evaluate_run(module.reference, tuned, config.eval.samples, config.eval.seed,
                            config.eval.batch_size, config.eval.scales, str(module.device))
        for row in rows:
            row.update(finetune_seconds=round(seconds, 1), steps=int(trainer.global_step),
                       beta=module.hparams.beta, lam=module.hparams.lam, seed=config.eval.seed)
        from agsearch.cca import format_rows

        atomic_write_text(cli.run_dir / "results.md", format_rows(rows) + "\n")
    atomic_write_text(cli.run_dir / "results.json", json.dumps(rows, indent=2) + "\n")
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if hasattr(exp, "finish"):
            exp.finish()
    return cli.run_dir, rows, seconds


def cca_main(argv: list[str]) -> int:
    try:
        out, rows, seconds = run_cca(argv)
    except SystemExit as e:  # --help / --print_config
        return int(e.code or 0)
    except CCAInputError as e:
        print(f"agsearch cca: error: {e}", file=sys.stderr)
        return 2
    from agsearch.cca import format_rows

    print(f"fine-tuned in {seconds:.0f} s; wrote {out / 'digits_ar_cca.safetensors'}, {out / 'results.json'}")
    if rows:
        print(format_rows(rows))
    return 0
