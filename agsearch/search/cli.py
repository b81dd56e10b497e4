"""``agsearch search`` (LightningCLI) and ``agsearch export``.

``agsearch search`` with no arguments runs the built-in digits search (DDIM, 25 steps, the
cfg_scales space: cfg at five scales or cond, budget 35 of 50 NFE), writes the discretised policy with its provenance
and held-out metrics, and prints it next to full CFG, the cutoff and the best guidance interval
at the same NFE. ``--config FILE`` and dotted overrides (``--model.budget=33``,
``--trainer.max_steps=200``) work as in any LightningCLI; ``--print_config`` shows the whole
configuration. Every run gets a directory ``<trainer.default_root_dir>/<space>-b<budget>-<time>``
holding ``config.yaml``, ``checkpoints/last.ckpt``, ``gates.json``/``gates.png``, the W&B
offline run and ``policy.json``. ``--ckpt_path CKPT`` resumes a run in its own directory.

On a local diffusers pipeline (``--model.pipeline=DIR --model.prompts=FILE``, Stable Diffusion
1.x/2.x or 3) the teacher is the pipeline's full CFG from the same noise and prompt; the
provenance names the folder and the prompt file, and the final comparison is full CFG, the
searched policy and the cutoff at its NFE by MSE of the final latents to full CFG on held-out
pairs (the digits baselines need the digits classifier). Bad input — a missing folder, an
unsupported pipeline class, an empty or malformed prompt file — is one line and exit code 2,
before the run directory is created.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from agsearch.policy import Policy

DEFAULT_ROOT = "runs/search"
TRAINER_DEFAULTS = {
    "max_steps": 24,  # 3 epochs of 256 pairs at batch 32
    "max_epochs": -1,
    "accelerator": "auto",
    "devices": 1,
    "default_root_dir": DEFAULT_ROOT,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


class SearchInputError(ValueError):
    """A configuration the user can fix (one line, exit code 2)."""


def _cli_class():
    from pytorch_lightning.cli import LightningCLI

    from agsearch.search.data import GuidancePairs
    from agsearch.search.module import PolicySearchModule

    class SearchCLI(LightningCLI):
        def __init__(self, args):
            super().__init__(
                PolicySearchModule, GuidancePairs, args=args, run=False,
                trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"exit_on_error": False, "prog": "agsearch search",
                               "description": "Differentiable search of a per-step guidance policy."},
                auto_configure_optimizers=False,
            )

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--out", type=Optional[str], default=None,
                                help="policy JSON to write (default: <run dir>/policy.json)")
            parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                                help="resume from this checkpoint (continues its run directory)")
            parser.add_argument("--eval.samples", type=int, default=100,
                                help="held-out samples for the final comparison (0: skip it)")
            parser.add_argument("--eval.seed", type=int, default=1, help="held-out noise seed (search uses data.seed)")
            parser.add_argument("--eval.batch_size", type=int, default=1000)
            parser.add_argument("--eval.baselines", type=bool, default=True,
                                help="also evaluate the cutoff and every guidance interval at the same NFE")
            parser.add_argument("--wandb.mode", type=Literal["offline", "online", "disabled"], default="offline",
                                help="W&B for the default logger: offline (no login, never blocks), online, "
                                     "or disabled (a CSV logger instead)")
            parser.add_argument("--wandb.project", type=str, default="agsearch")
            parser.add_argument("--progress", type=bool, default=True, help="progress bars")

        def before_instantiate_classes(self) -> None:
            config = self.config
            self.run_dir = _run_dir(config)
            import os

            os.environ["AGSEARCH_RUN_DIR"] = str(self.run_dir)

        def instantiate_trainer(self, **kwargs):
            from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

            from agsearch.search.adaptive import ThresholdSearchModule
            from agsearch.search.callbacks import GateMonitor, ThresholdMonitor, progress_bar

            config = self.config
            # Made only now that the model and data were built: bad input leaves no directory.
            self.run_dir.mkdir(parents=True, exist_ok=True)
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            trainer_config["default_root_dir"] = str(self.run_dir)
            trainer_config["enable_progress_bar"] = bool(config.progress) and trainer_config.get("enable_progress_bar", True) is not False
            given = [*extra, trainer_config.get("callbacks") or []]
            given = [c for item in given for c in (item if isinstance(item, list) else [item])]
            if trainer_config["enable_progress_bar"] and not any(isinstance(c, ProgressBar) for c in given):
                extra.append(progress_bar())
            if trainer_config.get("logger") in (None, True):
                trainer_config["logger"] = _default_logger(self.run_dir, config)
            adaptive = isinstance(self.model, ThresholdSearchModule)
            self.gate_monitor = (ThresholdMonitor if adaptive else GateMonitor)(self.run_dir)
            extra += [self.gate_monitor,
                      ModelCheckpoint(dirpath=self.run_dir / "checkpoints", filename="last", save_top_k=1,
                                      every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)]
            return self._instantiate_trainer(trainer_config, extra)

    return SearchCLI


def _run_dir(config) -> Path:
    import os

    # DDP's launcher re-runs this command in every extra process: they share rank 0's directory.
    if "AGSEARCH_RUN_DIR" in os.environ and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return Path(os.environ["AGSEARCH_RUN_DIR"])
    if config.get("ckpt_path"):
        ckpt = Path(config.ckpt_path)
        if not ckpt.is_file():
            raise SearchInputError(f"--ckpt_path {ckpt}: no such checkpoint file")
        if ckpt.parent.name == "checkpoints":
            return ckpt.parent.parent
    root = Path(config.trainer.get("default_root_dir") or DEFAULT_ROOT)
    space = Path(str(config.model.space)).stem if isinstance(config.model.space, str) else "space"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = root / f"{space}-b{config.model.budget}-{stamp}"
    n = 1
    while run.exists():
        n += 1
        run = root / f"{space}-b{config.model.budget}-{stamp}-{n}"
    return run


def _default_logger(run_dir: Path, config):
    if config.wandb.mode == "disabled":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="", version="")
    import os

    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(save_dir=str(run_dir), project=config.wandb.project, name=run_dir.name,
                       offline=config.wandb.mode == "offline", log_model=False)


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    text = "; ".join(lines[:3]) if lines else "invalid arguments"
    return text if len(text) < 400 else text[:397] + "..."


class _QuietLightning(logging.Filter):
    """Drop Lightning's chatter that says nothing about this run (seed banner, product tips)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Seed set to") or "litlogger" in message.lower())


def build_cli(argv: list[str]):
    """Parse ``argv`` and instantiate model, data and trainer (raises SearchInputError)."""
    for name in ("lightning_fabric.utilities.seed", "pytorch_lightning.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLightning) for f in logger.filters):
            logger.addFilter(_QuietLightning())
    from jsonargparse import ArgumentError

    cls = _cli_class()
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it also sees a command line
    try:
        return cls(argv)
    except (ArgumentError, ValueError) as e:  # ValueError includes SpaceError
        raise SearchInputError(_one_line(str(e))) from None
    finally:
        sys.argv = saved


def run_search(argv: list[str]) -> tuple[Policy | None, Path | None, list[dict]]:
    """One search run: fit, export, evaluate, save. Returns (policy, its path, comparison records);
    (None, None, []) on non-zero DDP ranks."""
    cli = build_cli(argv)
    trainer, module, config = cli.trainer, cli.model, cli.config
    out = Path(config.out) if config.out else cli.run_dir / "policy.json"
    if out.is_dir():
        raise SearchInputError(f"--out {out} is a directory; give a file name")
    if config.eval.samples < 0 or config.eval.samples == 1:
        raise SearchInputError(f"Expected eval.samples to be 0 (skip) or at least 2, but got {config.eval.samples}")
    if config.eval.batch_size < 1:
        raise SearchInputError(f"Expected eval.batch_size >= 1, but got {config.eval.batch_size}")
    if trainer.is_global_zero:
        print(f"agsearch search: run directory {cli.run_dir}", file=sys.stderr)
    from agsearch.search.module import NonFiniteLossError

    try:
        trainer.fit(module, datamodule=cli.datamodule, ckpt_path=config.ckpt_path)
    except NonFiniteLossError as e:
        last = cli.run_dir / "checkpoints" / "last.ckpt"
        where = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was written before it"
        raise NonFiniteLossError(f"{e}; {where}") from None
    if not trainer.is_global_zero:
        return None, None, []
    if trainer.interrupted:
        raise KeyboardInterrupt

    data = cli.datamodule.hparams
    from agsearch.search.adaptive import ThresholdSearchModule

    run = dict(seed=int(data.seed), pairs=int(data.num_pairs), batch_size=int(data.batch_size),
               processes=int(trainer.world_size), run_dir=str(cli.run_dir),
               checkpoint=str(cli.run_dir / "checkpoints" / "last.ckpt"))
    if isinstance(module, ThresholdSearchModule):
        policy = module.export_policy(calibration_seed=int(data.calibration_seed),
                                      calibration_pairs=int(data.num_calibration), **run)
    else:
        picks, polish = module.discrete_indices(), None
        if module.hparams.polish_rounds and data.num_val:
            from agsearch.search.data import PairDataset

            batch = PairDataset(data.val_seed, data.num_val, module.backend.num_conditions).batch(module.device)
            picks, polish = module.polish_starts(batch, picks, module.hparams.polish_rounds)
        policy = module.export_policy(picks=picks, polish=polish, **run)
    metrics = {k: round(float(v), 8) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    policy.metrics["search"] = metrics
    records: list[dict] = []
    if config.eval.samples:
        records = evaluate_against_baselines(module, policy, config.eval.samples, config.eval.seed,
                                             config.eval.batch_size, config.eval.baselines, config.progress)
        searched = next(r for r in records if r["role"] == "searched")
        policy.metrics["eval"] = eval_metrics(searched, config.eval.seed)
    path = policy.save(out)
    cli.gate_monitor.write(module)
    from agsearch.search.callbacks import log_policy_artifact

    log_policy_artifact(trainer, path, f"policy-{cli.run_dir.name}", records)
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if hasattr(exp, "finish"):
            exp.finish()
    return policy, path, records


def describe(policy: Policy) -> str:
    """One line: a static policy's ops and NFE; an adaptive one's thresholds and calibrated mean NFE."""
    if policy.kind == "static":
        return f"{policy.label()}  {policy.ops_string()}  NFE {policy.nfe}"
    calibration = policy.provenance.get("search", {}).get("calibration", {})
    thetas = " ".join(f"{policy.threshold_at(i):.4f}" for i in range(policy.num_inference_steps - 1))
    nfe = f"  mean NFE {calibration['mean_nfe']:.2f} on {calibration['pairs']} calibration pairs" if calibration else ""
    return f"{policy.label()}  θ_t = {thetas}{nfe}"


def eval_metrics(record: dict, seed: int) -> dict:
    """The held-out metrics a policy file keeps, from an evaluation record."""
    keys = ("nfe", "accuracy", "mse", "psnr", "fd", "samples")  # a pipeline's records: no accuracy, PSNR, FD
    return {**{k: record[k] for k in keys if k in record}, "seed": seed}


def evaluate_against_baselines(module, policy: Policy, samples: int, seed: int, batch_size: int,
                               baselines: bool, progress: bool) -> list[dict]:
    """Held-out records of full CFG, the searched policy and (for cfg/cond NFE) the cutoff and
    the best guidance interval at the same NFE; on a pipeline, full CFG, the searched policy and
    the cutoff by MSE to full CFG (``compare.pipeline_comparison``)."""
    from agsearch.evaluation import DigitsEvaluator
    from agsearch.search.compare import pipeline_comparison, static_baselines

    if module.hparams.model == "pipeline":
        return pipeline_comparison(module, policy, samples, seed, batch_size)
    if module.hparams.model != "digits":
        return []
    evaluator = DigitsEvaluator(samples=samples, seed=seed, scheduler=module.hparams.scheduler,
                                batch_size=batch_size, device=str(module.device), progress=progress,
                                unet=module.backend.unet)
    T, w = module.num_inference_steps, module.guidance_scale
    records = [
        {**evaluator.evaluate(Policy.static(["cfg"] * T, w, name="full CFG")).as_dict(), "role": "teacher"},
        {**evaluator.evaluate(policy).as_dict(), "role": "searched"},
    ]
    if policy.kind == "adaptive":
        if baselines:  # AG: one threshold, calibrated to the same budget on the same pairs
            from agsearch.search.adaptive import calibrated_ag

            ag = calibrated_ag(module, policy)
            records.append({**evaluator.evaluate(ag).as_dict(), "role": "AG (same calibration)"})
        return records
    if baselines and policy.nfe is not None and T <= policy.nfe <= 2 * T:
        found = static_baselines(evaluator, T, w, policy.nfe)
        records.append({**found["cutoff"].as_dict(), "role": "cutoff"})
        best = found["interval"].as_dict()
        best["name"] = f"best of {len(found['intervals'])} intervals: {best['name']}"
        records.append({**best, "role": "best interval"})
    return records


def search_main(argv: list[str]) -> int:
    from agsearch.evaluation import format_table
    from agsearch.search.module import NonFiniteLossError

    try:
        policy, path, records = run_search(argv)
    except SystemExit as e:  # --help / --print_config
        return int(e.code or 0)
    except SearchInputError as e:
        print(f"agsearch search: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"agsearch search: {e}", file=sys.stderr)
        return 1
    if policy is None:
        return 0
    print(f"policy: {path}")
    print(describe(policy))
    if records:
        n, seed = records[0]["samples"], policy.metrics.get("eval", {}).get("seed")
        if "accuracy" in records[0]:
            print(f"held-out comparison, {n} samples (seed {seed}); `agsearch sweep` compares on 1000:")
        else:
            print(f"held-out comparison, {n} samples (seed {seed}); MSE of the final latents to full CFG:")
        print(format_table(records, markdown=False))
    return 0


# -- export -----------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path):
    """(``PolicySearchModule`` with the gates of a search checkpoint, the checkpoint dict);
    no pickle: weights_only."""
    from agsearch.search.module import PolicySearchModule

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SearchInputError(f"no such checkpoint file: {path}") from None
    except IsADirectoryError:
        raise SearchInputError(f"{path} is a directory, not a checkpoint file") from None
    except Exception as e:  # unpickling refused, truncated or not a checkpoint
        raise SearchInputError(f"{path} is not a readable search checkpoint ({type(e).__name__}: {_one_line(str(e))[:160]})") from None
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    if "gate_logits" not in state and "thresholds_u" not in state:
        raise SearchInputError(f"{path} is not an agsearch search checkpoint (no gate_logits or thresholds_u in its state_dict)")
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    import inspect

    names = set(inspect.signature(PolicySearchModule.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hparams.items() if k in names}
    if "space_spec" in hparams:
        kwargs["space"] = hparams["space_spec"]
    module = PolicySearchModule(**kwargs)
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    return module, checkpoint


def export_checkpoint(ckpt: str | Path, budget: int | None, out: str | Path, mode: str = "exact") -> Policy:
    """Discretise a checkpoint's gates at ``budget`` (a bad budget is a ValueError from
    ``discretize``, naming the valid range) and save the policy."""
    from agsearch.search.adaptive import ThresholdSearchModule
    from agsearch.search.data import CALIBRATION_SEED

    module, checkpoint = load_checkpoint(ckpt)
    data = checkpoint.get("datamodule_hyper_parameters", {})
    # Outside a trainer the module's global_step is 0: the checkpoint's counts.
    run = dict(seed=data.get("seed"), checkpoint=str(ckpt), train_steps=int(checkpoint.get("global_step", 0)))
    if isinstance(module, ThresholdSearchModule):
        policy = module.export_policy(budget, calibration_seed=int(data.get("calibration_seed", CALIBRATION_SEED)),
                                      calibration_pairs=int(data.get("num_calibration", 512)), **run)
    else:
        policy = module.export_policy(budget, mode, **run)
    policy.save(out)
    return policy


def export_main(args) -> int:
    policy = export_checkpoint(args.checkpoint, args.budget, args.out, args.mode)
    print(f"{args.out}: {describe(policy)}")
    return 0
