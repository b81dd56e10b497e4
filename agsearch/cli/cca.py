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
import sys
import time
from pathlib import Path

from agsearch.cli.common import (
    UserError,
    after_interrupt,
    build_command_cli,
    command_cli,
    run_command,
    trainer_defaults,
)

DEFAULT_ROOT = "runs/cca"
TRAINER_DEFAULTS = trainer_defaults(max_steps=80,  # ~3.6 epochs of the 1,437 training digits at batch 64
                                    log_every_n_steps=5,
                                    enable_checkpointing=False)  # our own ModelCheckpoint goes into the run directory
DEFAULT_SCALES = [1.5, 2.0, 3.0, 4.0]


def _cli_class():
    from agsearch.cca import CCAModule, DigitsTokens

    class CCACLI(command_cli()):
        eval_samples = 1000
        out_help = "output directory (default: runs/cca/<time>)"

        def __init__(self, args):
            super().__init__(CCAModule, DigitsTokens, args, prog="agsearch cca",
                             description="CCA fine-tuning of the built-in AR digits model, then evaluation.",
                             trainer_defaults=TRAINER_DEFAULTS)

        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_argument("--eval.scales", type=list[float], default=DEFAULT_SCALES,
                                help="CFG scales swept for the base model's best CFG")

        def before_instantiate_classes(self) -> None:
            config = self.config
            out = Path(config.out) if config.out else Path(DEFAULT_ROOT) / time.strftime("%Y%m%d-%H%M%S")
            if out.exists() and not out.is_dir():
                raise UserError(f"--out {out} is a file; give a directory")
            if not config.eval.scales or any(s <= 0 for s in config.eval.scales):
                raise UserError(f"Expected eval.scales to be positive guidance scales, but got {config.eval.scales}")
            self.run_dir = out  # made only once the module and data were built: bad input leaves no directory

        def instantiate_trainer(self, **kwargs):
            from pytorch_lightning.callbacks import ModelCheckpoint

            self.make_run_dir()
            trainer_config, extra = self.trainer_config(kwargs, logger_name=f"cca-{self.run_dir.name}")
            trainer_config["enable_checkpointing"] = True
            extra.append(ModelCheckpoint(dirpath=self.run_dir / "checkpoints", filename="last", save_top_k=1,
                                         enable_version_counter=False))
            return self.build_trainer(trainer_config, extra)

    return CCACLI


def build_cli(argv: list[str]):
    """Parse ``argv`` and instantiate module, data and trainer (raises :class:`UserError`)."""
    return build_command_cli(_cli_class(), argv, errors=(FileNotFoundError,))  # bad β, λ, null ratio, reference


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
    import warnings

    from agsearch.io import atomic_write_text
    from agsearch.models.digits_ar import save_model

    cli = build_cli(argv)
    trainer, module, config = cli.trainer, cli.model, cli.config
    # The frozen reference is in eval mode on purpose (no dropout): not worth a warning.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    print(f"agsearch cca: output directory {cli.run_dir}", file=sys.stderr)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=cli.datamodule)
    except SystemExit:  # Lightning's graceful shutdown after Ctrl-C ends in sys.exit(1)
        if not trainer.interrupted:
            raise
        raise KeyboardInterrupt(after_interrupt(cli.run_dir, removable=cli.made_run_dir)) from None
    seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise KeyboardInterrupt(after_interrupt(cli.run_dir, removable=cli.made_run_dir))
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
    code, result = run_command("agsearch cca", run_cca, argv)
    if code is not None:
        return code
    out, rows, seconds = result
    from agsearch.cca import format_rows

    print(f"fine-tuned in {seconds:.0f} s; wrote {out / 'digits_ar_cca.safetensors'}, {out / 'results.json'}")
    if rows:
        print(format_rows(rows))
    return 0
