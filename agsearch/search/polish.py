"""Polish: coordinate-descent refinement of a discretised policy with exact trajectories.

Gate gradients are first-order: they can be wrong where the sampler is far from linear — e.g. the
first DDIM steps with ``clip_sample``, where x̂₀ saturates at ±1 and the gradient says nothing
about what dropping guidance there costs — and the discretisation of several candidate scales can
overshoot. Each round visits every step and tries (a) every other op of the same NFE cost (another
scale; ``cond`` ↔ ``uncond``) and (b) the teacher's op, paid for at the step whose gates are least
sure of their dearer op; the best move that lowers the exact distance is kept at once. The NFE
never changes.

:func:`polish` is the search over moves; it asks an evaluator for the distances of candidate
policies. :class:`TrajectoryEvaluator` is the search's: it runs them on a batch of pairs through
the sampler, resuming each candidate from the current policy's trajectory paused before the first
step it changes (a move changes the policy from some step on, so it shares the current prefix).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from agsearch.guidance.sampler import Resume

Picks = list[int]  # one op index per step


def polish(picks: Picks, costs: list[int], logp: torch.Tensor, k_teacher: int | None, labels: list[str],
           rounds: int, distances: Callable[[list[Picks], Picks], list[float]],
           accept: Callable[[Picks], None] = lambda picks: None, progress: bool | None = None) -> tuple[Picks, dict]:
    """Refine ``picks`` for ``rounds`` rounds (see the module doc).

    ``costs`` are the ops' NFE, ``logp`` (T, K) the gates' log-probabilities (where to pay for a
    teacher op), ``k_teacher`` the index of full CFG at the run's scale (None: no such move),
    ``labels`` the ops' names for the record. ``distances(candidates, current)`` gives each
    candidate's exact distance to the teacher (``current``: the policy they are moves of);
    ``accept(picks)`` is told each policy that becomes the current one; ``progress``: a bar over
    the steps of each round (None: only on a terminal). Returns the picks and a record of the moves."""
    record = {"rounds": 0, "moves": [], "evaluations": 0}
    if rounds <= 0:
        return picks, record
    started = time.perf_counter()
    [current] = distances([picks], picks)
    record["evaluations"] += 1
    accept(picks)
    record["distance_before"] = current
    for r in range(rounds):
        improved = False
        bar = tqdm(range(len(picks)), desc=f"polish round {r + 1}/{rounds}", unit="step", leave=False,
                   disable=None if progress is None else not progress)
        for t in bar:
            candidates = list(moves(picks, t, costs, logp, k_teacher))
            if not candidates:
                continue
            scores = distances(candidates, picks)
            record["evaluations"] += len(candidates)
            j = min(range(len(candidates)), key=lambda j: scores[j])
            if scores[j] >= current:
                continue
            moved = candidates[j]
            changed = [f"{s}:{labels[picks[s]]}->{labels[moved[s]]}" for s in range(len(picks)) if moved[s] != picks[s]]
            picks, current, improved = moved, scores[j], True
            accept(picks)
            record["moves"].append(f"{', '.join(changed)} (distance {current:.6g})")
        record["rounds"] += 1
        if not improved:
            break
    record["distance_after"] = current
    record["seconds"] = round(time.perf_counter() - started, 2)
    return picks, record


def moves(p: Picks, t: int, costs: list[int], logp: torch.Tensor, k_teacher: int | None) -> Iterator[Picks]:
    """The moves at step ``t``: every other op of the same cost, and the teacher's op paid for at
    the step whose gates are least sure of their dearer op."""
    for j in range(len(costs)):
        if j != p[t] and costs[j] == costs[p[t]]:
            yield [*p[:t], j, *p[t + 1:]]
    if k_teacher is not None and p[t] != k_teacher and costs[k_teacher] > costs[p[t]]:
        extra = costs[k_teacher] - costs[p[t]]
        options = [(logp[s, p[s]] - logp[s, j], s, j) for s in range(len(p)) if s != t
                   for j in range(len(costs)) if costs[j] == costs[p[s]] - extra]
        if options:
            _, s, j = min(options)
            moved = list(p)
            moved[t], moved[s] = k_teacher, j
            yield moved


def first_change(p: Picks, current: Picks) -> int:
    return next((i for i, (a, b) in enumerate(zip(p, current)) if a != b), 0)


class TrajectoryEvaluator:
    """Exact distances of hard policies (op indices) to the teacher's final samples on one batch.

    ``run(weights, resume, callback)`` samples hard op weights (M·B, T, K) of M policies from the
    batch's noise repeated M times (resumed from ``resume`` where given) and returns the final
    samples; ``distance(samples, target)`` is the search's distance. Candidates that change the
    current policy from the same step on resume together, in one batch, from its trajectory paused
    before that step (``reuse=False``: always run in full, e.g. spaces with ``affine`` ops, which
    need the past estimates)."""

    def __init__(self, run: Callable, hard_weights: Callable[[Picks], torch.Tensor], target: torch.Tensor,
                 distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: int, reuse: bool):
        self._run, self.hard_weights, self.target, self.distance = run, hard_weights, target, distance
        self.B, self.reuse = batch, reuse
        self.paused: dict[tuple, dict[int, Resume]] = {}  # the last call's policies' paused trajectories
        self.current: tuple | None = None
        self.current_states: dict[int, Resume] = {}

    def accept(self, picks: Picks) -> None:
        """``picks`` is the current policy now: keep its trajectory (the old one's prefix up to the
        first changed step, its own from there)."""
        key = tuple(picks)
        if self.current is None:
            self.current_states = self.paused[key]
        else:
            first = first_change(picks, list(self.current))
            self.current_states = {**{i: v for i, v in self.current_states.items() if i < first}, **self.paused[key]}
        self.current = key

    def __call__(self, candidates: list[Picks], current: Picks) -> list[float]:
        out: dict[int, float] = {}
        self.paused = {}
        groups: dict[int, list[int]] = {}
        for j, p in enumerate(candidates):
            groups.setdefault(first_change(p, current), []).append(j)
        for start, members in groups.items():
            for j, (d, paused) in zip(members, self._batch([candidates[j] for j in members], start)):
                out[j] = d
                self.paused[tuple(candidates[j])] = paused
        return [out[j] for j in range(len(candidates))]

    def _batch(self, ps: list[Picks], start: int) -> list[tuple[float, dict[int, Resume]]]:
        """Each policy of ``ps`` (all resumed before step ``start``, run as one batch): its distance
        and its trajectory paused before every step it ran."""
        M, B = len(ps), self.B
        weights = torch.cat([self.hard_weights(p) for p in ps])
        paused: dict[int, Resume] = {}

        def pause(stats):
            paused[stats.i] = Resume(stats.i, stats.x, copy.deepcopy(stats.scheduler))

        resume = self.current_states.get(start) if self.reuse and start > 0 else None
        samples = self._run(weights, M, None if resume is None else resume.repeat(M), pause)
        return [(self.distance(samples[j * B:(j + 1) * B], self.target).item(),
                 paused if M == 1 else {i: r.part(j, M) for i, r in paused.items()}) for j in range(M)]


__all__ = ["polish", "moves", "first_change", "TrajectoryEvaluator"]
