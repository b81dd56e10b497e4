"""What every ``agsearch`` command shares: the user-error type (one line, exit code 2), quiet
Lightning logging, the run logger (W&B offline by default, or CSV), the Trainer defaults and the
LightningCLI base of ``agsearch search`` and ``agsearch cca``."""

from __future__ import annotations

import logging
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional


class UserError(ValueError):
    """Input the user can fix: the CLI prints it as one line and exits with code 2."""


def one_line(message: str) -> str:
    """A (possibly multi-line) library message as one line of at most 400 characters."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    text = "; ".join(lines[:3]) if lines else "invalid arguments"
    return text if len(text) < 400 else text[:397] + "..."


def printable(message) -> str:
    """``message`` with control characters escaped (a newline in a file name stays on one line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def run_command(prog: str, command, *args, failures: tuple[type[Exception], ...] = ()):
    """(exit code, result) of ``command(*args)``: (None, result) when it ran; 0 or its code for
    ``--help``-style exits; 2 with one line for a :class:`UserError`; 130 when interrupted (the
    interrupt's message says what was kept); 1 with one line for one of ``failures``."""
    try:
        return None, command(*args)
    except SystemExit as e:  # --help / --print_config
        return int(e.code or 0), None
    except UserError as e:
        print(f"{prog}: error: {printable(e)}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted{'; ' + printable(e) if str(e) else ''}", file=sys.stderr)
        return 130, None
    except failures as e:
        print(f"{prog}: {printable(e)}", file=sys.stderr)
        return 1, None


# -- quiet libraries ------------------------------------------------------------------------------------
class _QuietLightning(logging.Filter):
    """Drop Lightning's chatter that says nothing about this run (seed banner, product tips) and its
    Ctrl-C notice (our own interrupt line says what was kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Seed set to") or "litlogger" in message.lower()
                    or "Detected KeyboardInterrupt" in message)


def quiet_lightning() -> None:
    """Filter Lightning's seed banner and product tips (idempotent)."""
    for name in ("lightning_fabric.utilities.seed", "pytorch_lightning.utilities.rank_zero",
                 "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLightning) for f in logger.filters):
            logger.addFilter(_QuietLightning())


# -- Lightning runs ---------------------------------------------------------------------------------------
def trainer_defaults(**overrides) -> dict:
    """The Trainer settings every agsearch run starts from, with a command's own on top."""
    return {"max_epochs": -1, "accelerator": "auto", "devices": 1, "num_sanity_val_steps": 0,
            "enable_model_summary": False, **overrides}


def default_logger(run_dir: Path, mode: str = "offline", project: str = "agsearch", name: str | None = None):
    """W&B (``offline`` by default: no login, never blocks; or ``online``) or, with mode
    ``disabled``, a CSV logger, writing into ``run_dir``."""
    if mode == "disabled":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="", version="")
    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(save_dir=str(run_dir), project=project, name=name or run_dir.name,
                       offline=mode == "offline", log_model=False)


MAX_SIZE = 100_000  # samples, pairs and batch sizes of one run (as the argparse commands' --samples)
MAX_SEED = 10**9  # noise seeds are S·10⁶ + i: S up to 10⁹ keeps them inside torch's 64-bit seeds
LIMITS = {  # option: its range, in the commands that have it
    "eval.samples": (0, MAX_SIZE), "eval.batch_size": (1, MAX_SIZE), "eval.seed": (0, MAX_SEED),
    "data.num_pairs": (1, MAX_SIZE), "data.num_val": (0, MAX_SIZE), "data.num_calibration": (0, MAX_SIZE),
    "data.batch_size": (1, MAX_SIZE), "data.seed": (0, MAX_SEED), "data.val_seed": (0, MAX_SEED),
    "data.calibration_seed": (0, MAX_SEED), "seed_everything": (0, 2**32 - 1),  # Lightning's (numpy's) range
    "trainer.max_steps": (-1, 10**7),
}


@lru_cache(maxsize=None)
def command_cli():
    """The LightningCLI base of the training commands (imported lazily: Lightning is slow to load).

    A subclass passes its module and data classes, program name, description and Trainer
    defaults; it gets the shared options (``--out``, ``--eval.samples/seed/batch_size``,
    ``--wandb.mode/project``, ``--progress``), their checks and the Trainer assembly (run
    directory, progress bar, logger) as :meth:`trainer_config`."""
    from pytorch_lightning.cli import LightningCLI

    class CommandCLI(LightningCLI):
        def __init__(self, model_class, datamodule_class, args, *, prog: str, description: str, trainer_defaults: dict,
                     **kwargs):
            super().__init__(model_class, datamodule_class, args=args, run=False, trainer_defaults=trainer_defaults,
                             seed_everything_default=0, save_config_kwargs={"overwrite": True},
                             parser_kwargs={"exit_on_error": False, "prog": prog, "description": description},
                             **kwargs)

        eval_samples = 100  # the default of --eval.samples
        out_help = "where to write the result"

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--out", type=Optional[str], default=None, help=self.out_help)
            parser.add_argument("--eval.samples", type=int, default=self.eval_samples,
                                help="held-out samples for the final evaluation (0: skip it)")
            parser.add_argument("--eval.seed", type=int, default=1,
                                help="held-out noise seed: sample i uses seed·10⁶ + i (the search uses data.seed)")
            parser.add_argument("--eval.batch_size", type=int, default=1000)
            parser.add_argument("--wandb.mode", type=Literal["offline", "online", "disabled"], default="offline",
                                help="W&B for the default logger: offline (no login, never blocks), online, "
                                     "or disabled (a CSV logger instead)")
            parser.add_argument("--wandb.project", type=str, default="agsearch")
            parser.add_argument("--progress", type=bool, default=True, help="progress bars")

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            self.check_limits(self.config)  # before Lightning seeds anything or a subclass builds anything

        def check_limits(self, config) -> None:
            """The shared options' ranges and the sizes and seeds of :data:`LIMITS`."""
            if config.eval.samples < 0 or config.eval.samples == 1:
                raise UserError(f"Expected eval.samples to be 0 (skip) or at least 2, but got {config.eval.samples}")
            for option, (lo, hi) in LIMITS.items():
                value = config.get(option)
                if isinstance(value, bool) or not isinstance(value, int):
                    continue  # absent here, or seed_everything=true (a random seed)
                if not lo <= value <= hi:
                    raise UserError(f"Expected {option} in [{lo:,}, {hi:,}], but got {value}")

        def make_run_dir(self) -> None:
            """Create the run directory (only once model and data were built: bad input leaves none)."""
            self.made_run_dir = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)

        def build_trainer(self, trainer_config: dict, extra: list):
            """The Trainer; settings it refuses (an accelerator this machine lacks, bad devices)
            are a :class:`UserError`, and a run directory made for it is removed."""
            from lightning_fabric.utilities.exceptions import MisconfigurationException

            try:
                return self._instantiate_trainer(trainer_config, extra)
            except (MisconfigurationException, ValueError, TypeError) as e:
                if getattr(self, "made_run_dir", False):
                    import shutil

                    shutil.rmtree(self.run_dir, ignore_errors=True)
                raise UserError(f"trainer: {one_line(str(e))}") from None

        def trainer_config(self, kwargs: dict, logger_name: str | None = None) -> tuple[dict, list]:
            """(Trainer settings, extra callbacks) with this run's directory, progress bar and logger."""
            config = self.config
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            trainer_config["default_root_dir"] = str(self.run_dir)
            trainer_config["enable_progress_bar"] = (bool(config.progress)
                                                     and trainer_config.get("enable_progress_bar", True) is not False)
            if trainer_config.get("logger") in (None, True):
                trainer_config["logger"] = default_logger(self.run_dir, config.wandb.mode, config.wandb.project,
                                                          logger_name)
            return trainer_config, extra

    return CommandCLI


def after_interrupt(run_dir: Path, removable: bool) -> str:
    """What an interrupted training run leaves, as the interrupt's message: its last epoch's
    checkpoint, to resume from; else, for a directory this run made, nothing (it held only the
    config and the logger's files)."""
    import shutil

    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return f"resume with --ckpt_path {last}"
    if removable and run_dir.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        return f"no epoch had ended: removed {run_dir}"
    return f"no epoch had ended: no checkpoint in {run_dir}"


def _config_files(argv: list[str]) -> list[str]:
    """The files of ``--config FILE``, ``--config=FILE`` and ``-c FILE`` in ``argv``."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_file(path: str) -> None:
    """A ``--config`` file must be readable UTF-8 YAML holding a mapping: anything else is one line
    naming the file (LightningCLI would say "Unexpected config:" or a codec error)."""
    from agsearch.io import parse_yaml, read_text_file

    document = parse_yaml(read_text_file(path, "config file", UserError, max_bytes=16 * 2**20), f"--config {path}",
                          UserError)
    if document is None:
        raise UserError(f"--config {path}: the file is empty (expected a mapping such as 'model: {{budget: 35}}')")
    if not isinstance(document, dict):
        raise UserError(f"--config {path}: expected a mapping of options, got a {type(document).__name__}")


def build_command_cli(cli_class, argv: list[str], errors: tuple[type[Exception], ...] = ()):
    """Parse ``argv`` with a :func:`command_cli` subclass and instantiate model, data and trainer;
    a bad argument (``ArgumentError``, ``ValueError`` or one of ``errors``) is a :class:`UserError`."""
    from jsonargparse import ArgumentError

    for path in _config_files(argv):
        check_config_file(path)
    quiet_lightning()
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it also sees a command line
    try:
        return cli_class(argv)
    except UserError:
        raise
    except (ArgumentError, ValueError, *errors) as e:  # ValueError includes SpaceError
        raise UserError(one_line(str(e))) from None
    finally:
        sys.argv = saved
