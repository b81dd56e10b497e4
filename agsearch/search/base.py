"""What the gate search and the threshold search share: the run's settings, input checks, the
errors, and the Lightning hooks for timing, checkpoints and the frozen model's device."""

from __future__ import annotations

import time

import pytorch_lightning as pl

DISTANCES = ("mse", "l1")


class NonFiniteLossError(RuntimeError):
    """The search loss became NaN or infinite; the run stops at that step."""


def resolve_run(model: str | None, pipeline: str | None, prompts: str | None, scheduler: str | None,
                num_inference_steps: int | None, guidance_scale: float | None) -> tuple[str, str, int, float]:
    """(model, scheduler, T, w) of a run. ``model=None`` (the default) is the built-in shapes
    pipeline (``builtin:shapes_edit``: the built-in editor), or ``pipeline`` for a folder given by
    ``pipeline``; unset settings take the model's benchmark (or pipeline) defaults."""
    if model is None:
        model = {None: "shapes", "builtin:shapes": "shapes", "builtin:shapes_edit": "shapes_edit"}.get(pipeline, "pipeline")
    for name in ("shapes", "shapes_edit"):
        check(model != name or pipeline in (None, f"builtin:{name}"),
              f"model.model={name} is the built-in pipeline builtin:{name}; model.pipeline={pipeline} names another "
              "(leave model.model unset for a folder)")
    check(model != "digits" or pipeline is None,
          f"model.model=digits is the built-in class-conditional UNet; model.pipeline={pipeline} names a "
          "pipeline (leave model.model unset for a folder)")
    from agsearch.diffusers.schedulers import SCHEDULERS

    check(scheduler is None or scheduler in SCHEDULERS,
          f"Expected model.scheduler in {sorted(SCHEDULERS)}, but got {scheduler!r}")
    settings = model_settings(model, pipeline, prompts)
    # ``is None``, not ``or``: an explicit 0 is refused by the module's checks, not replaced by the default.
    return (model, scheduler or settings["scheduler"],
            settings["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
            float(guidance_scale if guidance_scale is not None else settings["guidance_scale"]))


def check_size(model: str, height: int | None, width: int | None, num_frames: int | None) -> None:
    """A pipeline folder's size options: positive multiples of 8 (frames 4k + 1), for folders only."""
    given = {k: v for k, v in (("height", height), ("width", width), ("num_frames", num_frames)) if v is not None}
    check(not given or model == "pipeline",
          f"model.{next(iter(given), '')} sets a pipeline folder's size; model {model!r} has its own")
    for name in ("height", "width"):
        value = given.get(name)
        check(value is None or (isinstance(value, int) and 8 <= value <= 8192 and value % 8 == 0),
              f"Expected model.{name} to be a multiple of 8 in [8, 8192], but got {value!r}")
    check(num_frames is None or (isinstance(num_frames, int) and 1 <= num_frames <= 1024 and (num_frames - 1) % 4 == 0),
          f"Expected model.num_frames to be 4k + 1 in [1, 1024], but got {num_frames!r}")


def is_adaptive(space) -> bool:
    """Whether a space (a name, file or mapping) is an adaptive one (per-step thresholds, not gates)."""
    from agsearch.search.space import SearchSpace

    if isinstance(space, dict):
        return space.get("kind") == "adaptive"
    return SearchSpace.load(space).kind == "adaptive"


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def model_settings(model: str, pipeline: str | None = None, prompts: str | None = None) -> dict:
    if model == "digits" and prompts is not None:
        raise ValueError(f"model.prompts={prompts} needs model.pipeline=DIR (the text-to-image pipeline they prompt)")
    if model == "digits":
        from agsearch.models.digits import benchmark_settings

        return benchmark_settings()
    if model == "shapes":
        from agsearch.models.shapes import benchmark_settings

        if prompts is not None:
            from agsearch.eval.shapes import read_captions

            read_captions(prompts)  # a caption the grammar cannot parse fails here, with the line and word
        settings = benchmark_settings()
        return {k: settings[k] for k in ("scheduler", "num_inference_steps", "guidance_scale")}
    if model == "shapes_edit":
        from agsearch.models.shapes import edit_benchmark_settings

        if prompts is not None:
            raise ValueError(f"model.prompts={prompts}: the shapes editor searches on its own training edits "
                             "(leave model.prompts unset)")
        settings = edit_benchmark_settings()
        return {k: settings[k] for k in ("scheduler", "num_inference_steps", "guidance_scale")}
    if model == "pipeline":
        from agsearch.search.backends import pipeline_settings

        if pipeline is None:
            raise ValueError("model.model=pipeline needs model.pipeline=DIR (a local diffusers pipeline folder)")
        return pipeline_settings(pipeline, prompts)
    from agsearch.search.backends import MODELS

    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")


class SearchBase(pl.LightningModule):
    """What both searches share: the wall-time accounting kept in checkpoints, the temperature
    schedule and the frozen model's device. A subclass sets ``space`` and ``backend`` and keeps
    ``guidance_scale`` in its hyperparameters."""

    def __init__(self):
        super().__init__()
        self.search_seconds = 0.0
        self._fit_started: float | None = None

    @property
    def guidance_scale(self) -> float:
        return float(self.hparams.guidance_scale)

    # -- what the command line asks of a search --------------------------------------------------------
    def monitor(self, run_dir):
        """The callback that records this search's history into ``run_dir`` (gates or thresholds)."""
        raise NotImplementedError

    def end_of_run_policy(self, data, **provenance):
        """The policy a finished run exports; ``data`` holds the data module's settings (seeds, pair
        counts), ``provenance`` what the policy file records of the run."""
        raise NotImplementedError

    def exported_policy(self, budget: int | None, mode: str, data, **provenance):
        """The policy of a checkpoint at another ``budget`` (``agsearch export``)."""
        raise NotImplementedError

    def schedule_steps(self) -> int:
        """The run's length in optimiser steps, over which the temperature goes from start to end
        (``trainer.max_steps``, else the trainer's estimate; 0 outside a trainer). Checkpoints keep
        it: a resumed run must have the same length to end where one run would."""
        if self._trainer is None:
            return 0
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        return int(self.trainer.estimated_stepping_batches)

    def temperature(self) -> float:
        total = self.schedule_steps()
        progress = self.global_step / max(1, total - 1) if total else 1.0
        return self.space.temperature.at(progress)

    def _on_device(self):
        if self.backend.unet.device != self.device:
            self.backend.to(self.device)

    def on_fit_start(self):
        self._on_device()
        self._fit_started = time.perf_counter()

    def on_fit_end(self):
        if self._fit_started is not None:
            self.search_seconds += time.perf_counter() - self._fit_started
            self._fit_started = None

    def on_save_checkpoint(self, checkpoint):
        elapsed = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
        checkpoint["agsearch"] = {"search_seconds": self.search_seconds + elapsed, "schedule_steps": self.schedule_steps()}

    def on_load_checkpoint(self, checkpoint):
        self.search_seconds = float(checkpoint.get("agsearch", {}).get("search_seconds", 0.0))
