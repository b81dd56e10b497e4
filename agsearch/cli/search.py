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

import pickle
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from agsearch.cli.common import (
    UserError,
    after_interrupt,
    build_command_cli,
    command_cli,
    one_line,
    run_command,
    trainer_defaults,
)
from agsearch.policy import Policy

DEFAULT_ROOT = "runs/search"
# A space's ``schedule`` keys and the options they set.
SCHEDULE_OPTIONS = {"max_steps": "trainer.max_steps", "batch_size": "data.batch_size", "num_pairs": "data.num_pairs",
                    "lr": "model.lr"}
TRAINER_DEFAULTS = trainer_defaults(max_steps=12,  # 3 epochs of 128 pairs at batch 32
                                    default_root_dir=DEFAULT_ROOT, log_every_n_steps=1)


def _cli_class():
    from agsearch.search.data import GuidancePairs
    from agsearch.search.modules import search_module

    class SearchCLI(command_cli()):
        eval_samples = 100
        out_help = "policy JSON to write (default: <run dir>/policy.json)"

        def __init__(self, args):
            self.argv = list(args)
            super().__init__(search_module, GuidancePairs, args, prog="agsearch search",
                             description="Differentiable search of a per-step guidance policy.",
                             trainer_defaults=TRAINER_DEFAULTS, auto_configure_optimizers=False)

        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                                help="resume from this checkpoint (continues its run directory)")
            parser.add_argument("--eval.baselines", type=bool, default=True,
                                help="also evaluate the cutoff and every guidance interval at the same NFE")
            parser.add_argument("--eval.clip_weights", type=Optional[str], default=None,
                                help="a pipeline search: open-clip weights (local safetensors) for CLIP scores "
                                     "and CLIP-space FD in the final comparison")
            parser.add_argument("--eval.clip_model", type=str, default="ViT-B-32",
                                help="the open-clip architecture of --eval.clip_weights")

        def before_instantiate_classes(self) -> None:
            config = self.config
            self.apply_space_schedule(config)
            if config.eval.clip_weights is not None:
                if not config.model.pipeline:
                    raise UserError("eval.clip_weights applies to a pipeline folder's search (model.pipeline=DIR)")
                from agsearch.eval.clip import check_clip_files

                try:
                    check_clip_files(config.eval.clip_model, config.eval.clip_weights)
                except ValueError as e:
                    raise UserError(f"eval.clip_weights: {e}") from None
            if config.out and Path(config.out).is_dir():
                raise UserError(f"--out {config.out} is a directory; give a file name")
            self.run_dir = _run_dir(config)
            import os

            os.environ["AGSEARCH_RUN_DIR"] = str(self.run_dir)

        def apply_space_schedule(self, config) -> None:
            """The space file's ``schedule`` for every option the command line leaves at its default."""
            from agsearch.search.space import SearchSpace

            try:
                schedule = SearchSpace.load(config.model.space).schedule
            except ValueError as e:  # SpaceError: an unknown name, or a file that is not a space
                raise UserError(f"model.space: {one_line(str(e))}") from None
            defaults = self.parser.get_defaults()
            for key, value in schedule.items():
                option = SCHEDULE_OPTIONS[key]
                given = any(arg.split("=")[0] == f"--{option}" for arg in self.argv)
                if not given and config[option] == defaults[option]:
                    config[option] = value

        def instantiate_trainer(self, **kwargs):
            from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

            from agsearch.search.callbacks import (
                progress_bar,
            )

            self.make_run_dir()
            trainer_config, extra = self.trainer_config(kwargs)
            given = [*extra, trainer_config.get("callbacks") or []]
            given = [c for item in given for c in (item if isinstance(item, list) else [item])]
            if trainer_config["enable_progress_bar"] and not any(isinstance(c, ProgressBar) for c in given):
                extra.append(progress_bar())
            self.gate_monitor = self.model.monitor(self.run_dir)
            extra += [self.gate_monitor,
                      ModelCheckpoint(dirpath=self.run_dir / "checkpoints", filename="last", save_top_k=1,
                                      every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)]
            return self.build_trainer(trainer_config, extra)

    return SearchCLI


def _run_dir(config) -> Path:
    import os

    # DDP's launcher re-runs this command in every extra process: they share rank 0's directory.
    if "AGSEARCH_RUN_DIR" in os.environ and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return Path(os.environ["AGSEARCH_RUN_DIR"])
    if config.get("ckpt_path"):
        ckpt = Path(config.ckpt_path)
        if not ckpt.is_file():
            raise UserError(f"--ckpt_path {ckpt}: no such checkpoint file")
        checkpoint = read_checkpoint(ckpt, "--ckpt_path ")  # a pickle or a foreign file is refused before anything is written
        scheduled = checkpoint.get("agsearch", {}).get("schedule_steps")
        max_steps = config.trainer.get("max_steps")
        if scheduled and max_steps and max_steps > 0 and max_steps != scheduled:
            raise UserError(f"--ckpt_path {ckpt}: its run's temperature schedule spans {scheduled} steps; resume it with "
                            f"--trainer.max_steps={scheduled} (another length would not give the policy of one run)")
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


def build_cli(argv: list[str]):
    """Parse ``argv`` and instantiate model, data and trainer (raises :class:`UserError`)."""
    return build_command_cli(_cli_class(), argv, errors=(OSError,))  # e.g. a pipeline folder with unreadable weights


def run_search(argv: list[str]) -> tuple[Policy | None, Path | None, list[dict]]:
    """One search run: fit, export, evaluate, save. Returns (policy, its path, comparison records);
    (None, None, []) on non-zero DDP ranks."""
    cli = build_cli(argv)
    trainer, module, config = cli.trainer, cli.model, cli.config
    out = Path(config.out) if config.out else cli.run_dir / "policy.json"
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name")
    if trainer.is_global_zero:
        print(f"agsearch search: run directory {cli.run_dir}", file=sys.stderr)
    from agsearch.search.base import NonFiniteLossError

    try:
        trainer.fit(module, datamodule=cli.datamodule, ckpt_path=config.ckpt_path, weights_only=True)
    except NonFiniteLossError as e:
        last = cli.run_dir / "checkpoints" / "last.ckpt"
        where = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was written before it"
        raise NonFiniteLossError(f"{e}; {where}") from None
    except SystemExit:  # Lightning's graceful shutdown after Ctrl-C ends in sys.exit(1)
        if not trainer.interrupted:
            raise
        raise KeyboardInterrupt(after_interrupt(cli.run_dir, removable=cli.made_run_dir)) from None
    if not trainer.is_global_zero:
        return None, None, []
    if trainer.interrupted:
        raise KeyboardInterrupt(after_interrupt(cli.run_dir, removable=cli.made_run_dir))

    data = cli.datamodule.hparams
    run = dict(seed=int(data.seed), pairs=int(data.num_pairs), batch_size=int(data.batch_size),
               processes=int(trainer.world_size), run_dir=str(cli.run_dir),
               checkpoint=str(cli.run_dir / "checkpoints" / "last.ckpt"))
    module.progress = config.progress  # the polish's bar
    policy = module.end_of_run_policy(data, **run)
    metrics = {k: round(float(v), 8) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    policy.metrics["search"] = metrics
    records: list[dict] = []
    if config.eval.samples:
        records = evaluate_against_baselines(module, policy, config.eval.samples, config.eval.seed,
                                             config.eval.batch_size, config.eval.baselines, config.progress,
                                             config.eval.clip_weights, config.eval.clip_model)
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
    keys = ("nfe", "accuracy", "adherence", *(k for k in record if k.startswith("adherence_")), "edit_success",
            "preservation", "edited", *(k for k in record if k.startswith("edit_success_")), "mse", "psnr", "fd",
            "clip_score", "clip_fd", "captions", "edits", "samples")  # each model's records have some of these
    return {**{k: record[k] for k in keys if k in record}, "seed": seed}


def evaluate_against_baselines(module, policy: Policy, samples: int, seed: int, batch_size: int,
                               baselines: bool, progress: bool, clip_weights: str | None = None,
                               clip_model: str = "ViT-B-32") -> list[dict]:
    """Held-out records of full CFG, the searched policy and its baselines
    (:func:`agsearch.search.compare.compare_with_baselines`) on the search model's evaluator: the
    digits evaluator (accuracy, FD; every guidance interval too) or, for a pipeline folder, latent
    MSE on held-out (noise, prompt) pairs (the cutoff only), with CLIP scores and CLIP-space FD to
    full CFG where ``clip_weights`` are given."""
    from agsearch.search.compare import compare_with_baselines

    clip = None
    if clip_weights is not None:
        from agsearch.eval.clip import ClipScorer

        try:
            clip = ClipScorer.load(clip_model, clip_weights, device=str(module.device))
        except ValueError as e:
            raise UserError(str(e)) from None
    evaluator = module.backend.evaluator(samples, seed, batch_size, str(module.device), progress, clip)
    return compare_with_baselines(evaluator, module, policy, baselines, intervals=module.hparams.model == "digits")


def search_main(argv: list[str]) -> int:
    from agsearch.eval.records import format_table
    from agsearch.search.base import NonFiniteLossError

    code, result = run_command("agsearch search", run_search, argv, failures=(NonFiniteLossError,))
    if code is not None:
        return code
    policy, path, records = result
    if policy is None:
        return 0
    print(f"policy: {path}")
    print(describe(policy))
    if records:
        n, seed = records[0]["samples"], policy.metrics.get("eval", {}).get("seed")
        if "accuracy" in records[0]:
            print(f"held-out comparison, {n} samples (seed {seed}); `agsearch sweep` compares on 1000:")
        elif "adherence" in records[0]:
            print(f"comparison on held-out noise, {n} samples (seed {seed}) of the {records[0]['captions']} captions; "
                  "MSE and PSNR of the decoded images to full CFG; `agsearch bench --model shapes --policy` compares "
                  "on both caption sets:")
        elif "edit_success" in records[0]:
            print(f"comparison on held-out noise, {n} samples (seed {seed}) of the {records[0]['edits']} instructions; "
                  "MSE and PSNR of the decoded edits to full two-condition guidance; `agsearch bench --model "
                  "shapes_edit --policy` compares on held-out instructions:")
        else:
            print(f"held-out comparison, {n} samples (seed {seed}); MSE of the final latents to full CFG:")
        print(format_table(records, markdown=False))
    return 0


# -- export -----------------------------------------------------------------------------------------
def read_checkpoint(path: Path, what: str = "") -> dict:
    """A search checkpoint's dict, loaded with ``weights_only=True`` (no pickle runs); a file that is
    not one is a :class:`UserError` naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what}{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise UserError(f"{what}{path} is a directory, not a checkpoint file") from None
    except pickle.UnpicklingError:  # torch's long weights_only advice does not apply: we never unpickle code
        raise UserError(f"{what}{path} is not a readable search checkpoint (not a torch file, or one that only "
                        "loads by running pickled code, which agsearch never does)") from None
    except Exception as e:  # truncated or not a checkpoint
        raise UserError(f"{what}{path} is not a readable search checkpoint "
                        f"({type(e).__name__}: {one_line(str(e))[:160]})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or ("gate_logits" not in state and "thresholds_u" not in state):
        raise UserError(f"{what}{path} is not an agsearch search checkpoint (no gate_logits or thresholds_u in its state_dict)")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{what}{path} is not an agsearch search checkpoint (state_dict[{str(bad)[:40]!r}] is not a tensor)")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{what}{path}: state_dict[{str(bad)[:40]!r}] holds NaN or infinite values "
                        "(the search diverged; export an earlier checkpoint or search again with a lower model.lr)")
    for key in ("hyper_parameters", "datamodule_hyper_parameters", "agsearch"):
        if not isinstance(checkpoint.get(key, {}), dict):
            raise UserError(f"{what}{path} is not an agsearch search checkpoint ({key} is not a mapping)")
    seconds = checkpoint.get("agsearch", {}).get("search_seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise UserError(f"{what}{path} is not an agsearch search checkpoint (agsearch.search_seconds is not a number)")
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    seed = checkpoint.get("datamodule_hyper_parameters", {}).get("seed")
    if seed is not None and not is_int(seed):
        raise UserError(f"{what}{path} is not an agsearch search checkpoint (its data seed is not an integer)")
    if not is_int(checkpoint.get("global_step", 0)):
        raise UserError(f"{what}{path} is not an agsearch search checkpoint (global_step is not an integer)")
    return checkpoint


def load_checkpoint(path: str | Path):
    """(the search module — gates or thresholds — of a search checkpoint, the checkpoint dict);
    no pickle: weights_only."""
    from agsearch.search.modules import GATE_PARAMETERS, search_module

    path = Path(path)
    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    kwargs = {k: v for k, v in hparams.items() if k in GATE_PARAMETERS}
    if "space_spec" in hparams:
        kwargs["space"] = hparams["space_spec"]
    try:
        module = search_module(**kwargs)
    except (ValueError, TypeError) as e:  # settings this version refuses, or of the wrong type
        raise UserError(f"{path}: {one_line(str(e))}") from None
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:  # gates of another shape than its own settings give
        raise UserError(f"{path}: its state does not fit its settings ({one_line(str(e))[:200]})") from None
    module.on_load_checkpoint(checkpoint)
    return module, checkpoint


def export_checkpoint(ckpt: str | Path, budget: int | None, out: str | Path, mode: str = "exact") -> Policy:
    """Discretise a checkpoint's gates at ``budget`` (a bad budget is a ValueError from
    ``discretize``, naming the valid range) and save the policy."""
    module, checkpoint = load_checkpoint(ckpt)
    data = checkpoint.get("datamodule_hyper_parameters", {})
    # Outside a trainer the module's global_step is 0: the checkpoint's counts.
    run = dict(seed=data.get("seed"), checkpoint=str(ckpt), train_steps=int(checkpoint.get("global_step", 0)))
    policy = module.exported_policy(budget, mode, data, **run)
    policy.save(out)
    return policy


def export_main(args) -> int:
    policy = export_checkpoint(args.checkpoint, args.budget, args.out, args.mode)
    print(f"{args.out}: {describe(policy)}")
    return 0
