"""Search spaces as data: which guidance ops every step may choose, what each costs, and how the
choice is relaxed into continuous gates.

A space file (``search_spaces/*.yaml``, shipped in the package as ``agsearch.search_spaces``)::

    name: minimal
    ops:
      - {op: cfg, nfe: 2}                      # CFG at the run's scale w
      - {op: cfg, scales: [1.5, 2.0], nfe: 2}  # CFG at fixed scales (one candidate each)
      - {op: cfg, strengths: [0.5, 2.0]}       # CFG at w' = 1 + m (w - 1) for each strength m
      - {op: cond, nfe: 1}
      - {op: uncond, nfe: 1}
      - {op: affine, nfe: 1, coefficients: builtin, train: false}   # LinearAG (agsearch.linear_ag)
    relaxation:
      kind: gumbel_st                          # or softmax
      temperature: {start: 1.0, end: 0.3, schedule: exponential}   # or linear, constant

An adaptive space (``kind: adaptive``, ``search_spaces/adaptive_cosine.yaml``) searches a per-sample
rule instead of gates: per-step thresholds θ_t on the agreement γ_t = cos(cond, uncond), CFG while
γ_t < θ_t and ``cond`` from then on (``agsearch.search.thresholds``)::

    name: adaptive_cosine
    kind: adaptive
    rule: {rule: ag_cosine, space: x0, stop_scales: true}   # γ in x̂_0 space (or eps); also
                                               # search each step's scale for the samples stopping there
    ops: [{op: cfg, nfe: 2}, {op: cond, nfe: 1}]   # the only pair the rule can gate
    relaxation:
      kind: stopping                           # P(still guiding) = Π σ((θ_s − γ_s)/τ)
      temperature: {start: 1.0, end: 0.05, schedule: exponential}

``nfe`` is optional; when given it must match what the op costs. ``affine`` takes its per-step
coefficients from a ``fit-affine`` file (``coefficients``: a path, or ``builtin`` for the built-in
model's shipped fit) and keeps them fixed, or trains them jointly with the gates (``train: true``);
where the previous step's estimates are missing (step 0, after ``cond``) it falls back to ``cond``,
so it always costs 1 NFE. Given a run's guidance scale a
space resolves to K concrete candidates — policy step dicts such as ``{"op": "cfg", "scale": 1.2}``
— with their NFE costs (K,). The gate logits of a search are (T, K) over these candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from agsearch.guidance.ops import EDIT_OP_NFE, OP_NFE
from agsearch.io import parse_yaml

RELAXATIONS = ("softmax", "gumbel_st")  # static spaces
ADAPTIVE_RELAXATIONS = ("stopping",)  # adaptive spaces
RULE_SPACES = ("x0", "eps")
SCHEDULES = ("exponential", "linear", "constant")
SEARCH_OPS = ("cfg", "cond", "uncond", "affine", "edit", "text", "joint")
EDIT_OPS = ("edit", "text", "joint")  # two-condition ops (an image editor; cond is shared)
NFE = {**OP_NFE, **EDIT_OP_NFE}


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Temperature:
    start: float = 1.0
    end: float = 0.3
    schedule: str = "exponential"

    def __post_init__(self):
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise SpaceError(f"Expected temperature {name} to be a positive number, but got {value!r}")
        if self.schedule not in SCHEDULES:
            raise SpaceError(f"Expected temperature schedule in {SCHEDULES}, but got {self.schedule!r}")

    def overridden(self, start: float | None = None, end: float | None = None) -> "Temperature":
        """This schedule with ``--model.temperature_start/end`` in place of its own (None: keep it)."""
        for name, value in (("start", start), ("end", end)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise SpaceError(f"Expected model.temperature_{name} to be a positive number, but got {value!r}")
        return Temperature(self.start if start is None else start, self.end if end is None else end, self.schedule)

    def at(self, progress: float) -> float:
        """τ at ``progress`` ∈ [0, 1] of the run."""
        p = min(max(progress, 0.0), 1.0)
        if self.schedule == "constant":
            return self.start
        if self.schedule == "linear":
            return self.start + p * (self.end - self.start)
        return self.start * (self.end / self.start) ** p


SCHEDULE = {"max_steps": int, "batch_size": int, "num_pairs": int, "lr": float}


def _schedule(schedule: Any, where: str) -> dict:
    """A space's ``schedule``: positive ``max_steps``, ``batch_size``, ``num_pairs`` (integers) and ``lr``."""
    if not isinstance(schedule, dict):
        raise SpaceError(f"{where}schedule: expected a mapping of {', '.join(SCHEDULE)}, got {schedule!r}")
    out = {}
    for key, value in schedule.items():
        kind = SCHEDULE.get(key)
        if kind is None:
            raise SpaceError(f"{where}schedule: unknown key {key!r} (expected {', '.join(SCHEDULE)})")
        ok = isinstance(value, int) and not isinstance(value, bool) if kind is int else \
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value <= 0:
            raise SpaceError(f"{where}schedule.{key}: expected a positive {kind.__name__}, got {value!r}")
        out[key] = kind(value)
    return out


@dataclass(frozen=True)
class SearchSpace:
    name: str
    ops: tuple[dict, ...]  # the file's op entries, as written
    relaxation: str = "gumbel_st"
    temperature: Temperature = field(default_factory=Temperature)
    source: str = ""
    kind: str = "static"  # or "adaptive": a threshold rule, not gates
    rule: dict | None = None  # adaptive: {"rule": "ag_cosine", "space": "x0"}
    # The training the space needs, applied where the command line leaves an option at its default:
    # {max_steps, batch_size, num_pairs, lr} (trainer.max_steps, data.batch_size, data.num_pairs, model.lr).
    schedule: dict = field(default_factory=dict)

    # -- resolution -------------------------------------------------------------------------
    def candidates(self, guidance_scale: float) -> list[dict]:
        """The K concrete policy steps for a run at ``guidance_scale``."""
        out: list[dict] = []
        for entry in self.ops:
            if entry["op"] == "affine":  # coefficients per step come from the search module
                out.append({"op": "affine", "fallback": "cond"})
                continue
            if entry["op"] != "cfg":
                out.append({"op": entry["op"]})
                continue
            scales = [float(s) for s in entry.get("scales", [])]
            scales += [1.0 + float(m) * (guidance_scale - 1.0) for m in entry.get("strengths", [])]
            if "scales" not in entry and "strengths" not in entry:
                scales = [float(guidance_scale)]
            for s in scales:
                step = {"op": "cfg"} if math.isclose(s, guidance_scale, rel_tol=0, abs_tol=1e-9) else {"op": "cfg", "scale": round(s, 6)}
                if step not in out:
                    out.append(step)
        return out

    @staticmethod
    def costs(candidates: list[dict]) -> list[int]:
        return [NFE[c["op"]] for c in candidates]

    @property
    def conditions(self) -> int:
        """2 for a space of an image editor's two-condition ops, else 1."""
        return 2 if any(e["op"] in EDIT_OPS for e in self.ops) else 1

    @property
    def full_op(self) -> dict:
        """The teacher's op at the run's scale: ``cfg``, or ``edit`` for a two-condition space."""
        return {"op": "edit"} if self.conditions == 2 else {"op": "cfg"}

    @staticmethod
    def labels(candidates: list[dict]) -> list[str]:
        return [c["op"] if "scale" not in c else f"cfg@{c['scale']:g}" for c in candidates]

    def affine_entry(self) -> dict | None:
        """The space's ``affine`` op entry (at most one), or None."""
        return next((dict(e) for e in self.ops if e["op"] == "affine"), None)

    def to_dict(self) -> dict:
        document = {"name": self.name}
        if self.kind == "adaptive":
            document.update(kind="adaptive", rule=dict(self.rule))
        document.update(ops=[dict(op) for op in self.ops],
                        relaxation={"kind": self.relaxation, "temperature": dict(self.temperature.__dict__)})
        if self.schedule:
            document["schedule"] = dict(self.schedule)
        return document

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, document: Any, source: str = "<dict>") -> "SearchSpace":
        where = f"{source}: "
        if not isinstance(document, dict):
            raise SpaceError(f"{where}a search space is a mapping with 'ops', got {type(document).__name__}")
        unknown = set(document) - {"name", "kind", "rule", "ops", "relaxation", "schedule", "description"}
        if unknown:
            raise SpaceError(f"{where}unknown key {sorted(unknown)[0]!r} (expected name, kind, rule, ops, relaxation, "
                             f"schedule)")
        schedule = _schedule(document.get("schedule", {}), where)
        kind = document.get("kind", "static")
        if kind not in ("static", "adaptive"):
            raise SpaceError(f"{where}kind: expected static or adaptive, got {kind!r}")
        rule = document.get("rule")
        if kind == "static" and rule is not None:
            raise SpaceError(f"{where}'rule' belongs to an adaptive space (kind: adaptive)")
        if kind == "adaptive":
            rule = {"rule": "ag_cosine", "space": "x0"} if rule is None else rule
            if not isinstance(rule, dict) or set(rule) - {"rule", "space", "stop_scales"} \
                    or rule.get("rule", "ag_cosine") != "ag_cosine" or rule.get("space", "x0") not in RULE_SPACES \
                    or not isinstance(rule.get("stop_scales", False), bool):
                raise SpaceError(f"{where}rule: expected {{rule: ag_cosine, space: x0 or eps, stop_scales: true or false}}, "
                                 f"got {rule!r}")
            rule = {"rule": "ag_cosine", "space": rule.get("space", "x0"), "stop_scales": rule.get("stop_scales", False)}
        ops = document.get("ops")
        if not isinstance(ops, list) or not ops:
            raise SpaceError(f"{where}'ops' must be a non-empty list, got {ops!r}")
        checked = []
        for j, entry in enumerate(ops):
            at = f"{where}ops[{j}]: "
            if not isinstance(entry, dict) or "op" not in entry:
                raise SpaceError(f"{at}expected a mapping with an 'op' key, got {entry!r}")
            op = entry["op"]
            if op not in SEARCH_OPS:
                raise SpaceError(f"{at}unknown op {op!r}; expected one of {', '.join(SEARCH_OPS)}")
            allowed = {"op", "nfe"} | ({"scales", "strengths"} if op == "cfg" else set())
            allowed |= {"coefficients", "train"} if op == "affine" else set()
            extra = set(entry) - allowed
            if extra:
                raise SpaceError(f"{at}unknown key {sorted(extra)[0]!r} for op {op!r}")
            if "nfe" in entry and entry["nfe"] != NFE[op]:
                raise SpaceError(f"{at}op {op!r} costs {NFE[op]} NFE, but the file says {entry['nfe']!r}")
            for key in ("scales", "strengths"):
                values = entry.get(key)
                if values is None:
                    continue
                if not isinstance(values, list) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values
                ):
                    raise SpaceError(f"{at}'{key}' must be a non-empty list of finite numbers >= 0, got {values!r}")
            if op == "affine":
                if not isinstance(entry.get("train", False), bool):
                    raise SpaceError(f"{at}'train' must be true or false, got {entry['train']!r}")
                if not isinstance(entry.get("coefficients", "builtin"), str):
                    raise SpaceError(f"{at}'coefficients' must be 'builtin' or a fit-affine JSON path, got {entry['coefficients']!r}")
            checked.append(dict(entry))
        names = [e["op"] for e in checked]
        if kind == "adaptive" and (sorted(names) != ["cfg", "cond"] or any(set(e) - {"op", "nfe"} for e in checked)):
            raise SpaceError(f"{where}an adaptive space gates CFG at the run's scale against cond and nothing else: "
                             f"its ops must be [cfg, cond] without scales, got {[_short_op(e) for e in checked]}")
        if any(n in EDIT_OPS for n in names) and any(n in ("cfg", "uncond", "affine") for n in names):
            raise SpaceError(f"{where}a space's ops guide either one condition (cfg, uncond, affine, cond) or an "
                             f"image editor's two (edit, text, joint, cond), not both: got {names}")
        if names.count("affine") > 1:
            raise SpaceError(f"{where}at most one 'affine' op per space, got {names.count('affine')}")
        relaxation = document.get("relaxation", {}) or {}
        if not isinstance(relaxation, dict):
            raise SpaceError(f"{where}'relaxation' must be a mapping, got {relaxation!r}")
        allowed_relaxations = ADAPTIVE_RELAXATIONS if kind == "adaptive" else RELAXATIONS
        relax = relaxation.get("kind", allowed_relaxations[-1])
        if relax not in allowed_relaxations:
            raise SpaceError(f"{where}relaxation.kind: expected one of {', '.join(allowed_relaxations)} for a {kind} "
                             f"space, got {relax!r}")
        temp = relaxation.get("temperature", {}) or {}
        if not isinstance(temp, dict) or set(temp) - {"start", "end", "schedule"}:
            raise SpaceError(f"{where}relaxation.temperature: expected start, end, schedule; got {temp!r}")
        try:
            temperature = Temperature(**temp)
        except SpaceError as e:
            raise SpaceError(f"{where}relaxation.temperature: {e}") from None
        space = cls(str(document.get("name", Path(source).stem)), tuple(checked), relax, temperature, source, kind, rule,
                    schedule)
        if len(space.candidates(2.0)) < 2:
            raise SpaceError(f"{where}a space needs at least two candidate ops to choose from, got {names}")
        return space

    @classmethod
    def load(cls, name_or_path: str | Path | dict) -> "SearchSpace":
        """A space by built-in name (``minimal``, ``adaptive_guidance``, ...), YAML path, or the
        mapping itself (as stored in a checkpoint)."""
        if isinstance(name_or_path, dict):
            return cls.from_dict(name_or_path, str(name_or_path.get("name", "<space>")))
        text, source = _read(str(name_or_path))
        return cls.from_dict(parse_yaml(text, source, SpaceError), source)


def _short_op(entry: dict) -> str:
    return entry["op"] if set(entry) <= {"op", "nfe"} else str({k: v for k, v in entry.items() if k != "nfe"})


def builtin_spaces() -> list[str]:
    root = resources.files("agsearch.search_spaces")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _exists(path) -> bool:
    """``path.exists()``, False for a name the file system refuses (e.g. longer than it allows)."""
    try:
        return path.exists()
    except OSError:
        return False


def _read(name_or_path: str) -> tuple[str, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or _exists(path):
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise SpaceError(f"cannot read search space file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    resource = resources.files("agsearch.search_spaces") / f"{name_or_path}.yaml"
    if not _exists(resource) or not resource.is_file():
        raise SpaceError(
            f"unknown search space {name_or_path!r}: not a file, and not one of the built-in spaces "
            f"({', '.join(builtin_spaces())})"
        )
    return resource.read_text(encoding="utf-8"), f"{name_or_path} ({resource.name})"
