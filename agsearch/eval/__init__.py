"""Evaluation: records and shared metrics (:mod:`.records`), one evaluator per model
(:mod:`.digits`, :mod:`.shapes`), CLIP scores for pipeline folders (:mod:`.clip`) and the
benchmark (:mod:`.bench`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agsearch.eval.base import Evaluator


def evaluator_for(model: str, *, samples: int = 1000, seed: int = 1, scheduler: str = "ddim", batch_size: int = 1000,
                  device: str = "cpu", progress: bool = True, captions=None) -> Evaluator:
    """The evaluator of a built-in model (``digits``, ``shapes`` or ``shapes_edit``, the image
    editor on held-out instructions; ``captions``: the shapes model's caption set, default the
    held-out one)."""
    if model == "digits":
        if captions is not None:
            raise ValueError("--captions is an option of --model shapes (the digits model has no captions)")
        from agsearch.eval.digits import DigitsEvaluator

        return DigitsEvaluator(samples=samples, seed=seed, scheduler=scheduler, batch_size=batch_size, device=device,
                               progress=progress)
    if model == "shapes":
        from agsearch.eval.shapes import ShapesEvaluator, max_batch

        return ShapesEvaluator(samples=samples, seed=seed, captions=captions or "heldout", scheduler=scheduler,
                               batch_size=min(batch_size, max_batch(device)), device=device, progress=progress)
    if model == "shapes_edit":
        from agsearch.eval.shapes import max_batch
        from agsearch.eval.shapes_edit import ShapesEditEvaluator

        if captions is not None:
            raise ValueError("--captions is an option of --model shapes (the editor evaluates held-out instructions)")
        return ShapesEditEvaluator(samples=samples, seed=seed, scheduler=scheduler,
                                   batch_size=min(batch_size, max_batch(device)),
                                   device=device, progress=progress)
    raise ValueError(f"unknown model {model!r}; expected digits, shapes or shapes_edit")
