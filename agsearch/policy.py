"""Guidance policies: the agsearch policy file (JSON, version 1) and its validation.

A policy says, for each of ``num_inference_steps`` sampling steps, which guidance operation the
sampler runs (``kind: "static"``), or gives a per-sample rule that decides it while sampling
(``kind: "adaptive"``, e.g. the Adaptive Guidance cosine rule of Castillo et al., arXiv 2312.12487).

    op       computes                          NFE
    cfg      ε_u + w_t (ε_c − ε_u)              2
    cond     ε_c (unconditional pass skipped)  1
    uncond   ε_u                               1
    affine   ε̂_u + w (ε_c − ε̂_u), ε̂_u an affine  1  (LinearAG, ``agsearch.linear_ag``; 2 where it
             map of past estimates (``coef``)       falls back to ``cfg``)

A policy with ``"axis": "tokens"`` runs over the token positions of an autoregressive model
(``agsearch.tokens``): one step per token, ``cfg`` guides the token's logits and ``cond`` skips its
unconditional pass; its NFE counts forward passes per sample, the unconditional stream's included,
which computes every position up to the last guided one (its key/value cache stays exact: a stream
that resumes first computes the positions it skipped). Its adaptive rule is ``token_divergence``.

A policy with ``"conditions": 2`` guides an image editor on its two conditions, the input image
and the text instruction (InstructPix2Pix, arXiv 2211.09800; ``agsearch.guidance.sampler.sample_edit``): its ops
are ``edit`` (3 passes, s_T = ``guidance_scale`` and s_I = ``image_guidance_scale``), ``text``
(2), ``joint`` (2) and ``cond`` (1), formulas in ``agsearch.guidance.ops``; its adaptive rule is
``ag_cosine`` on the agreement of both guidance directions.

An ``affine`` step needs the previous step's ε_c and ε_u (true or estimated) when its past
coefficients are non-zero. Where they are missing — step 0, or after a ``cond`` or ``uncond``
step — it runs its ``fallback`` (``cond`` or ``cfg``); a static policy whose affine step could
miss them without a fallback is invalid.

The JSON Schema ships as ``agsearch/schema/policy.schema.json``. Every error raised while loading
or validating is a :class:`PolicyError` whose one-line message names the file, the JSON pointer of
the offending field and the bad value.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from agsearch.guidance.ops import EDIT_OP_NFE, OP_NFE
from agsearch.io import atomic_write_text, read_text_file

FORMAT = "agsearch.policy"
VERSION = 1
RULES = ("ag_cosine", "token_divergence")
AXES = ("steps", "tokens")
# Limits (also in the schema): more steps than a diffusion model's training timesteps, or scales at
# which CFG's output is no longer a prediction, are refused before any work.
MAX_STEPS = 1000
MAX_SCALE = 100.0
MAX_POLICY_BYTES = 16 * 2**20


class PolicyError(ValueError):
    """An invalid policy: ``pointer`` is the JSON pointer of the bad field ("" for the document)."""

    def __init__(self, message: str, pointer: str = "", source: str | None = None):
        self.pointer, self.source, self.reason = pointer, source, message
        where = ": ".join(p for p in (source, pointer or None) if p)
        super().__init__(f"{where}: {message}" if where else message)


@lru_cache(maxsize=1)
def schema() -> dict:
    """The policy file's JSON Schema (draft 2020-12)."""
    text = resources.files("agsearch").joinpath("schema/policy.schema.json").read_text("utf-8")
    return json.loads(text)


def _pointer(path) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, allow_nan=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_finite(value: Any, path=()) -> None:
    """JSON has no NaN or infinity; Python dicts can, and the schema's bounds do not catch NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyError(f"{value} is not a finite number", _pointer(path))
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, (*path, i))


def validate(document: Any) -> None:
    """Raise :class:`PolicyError` unless ``document`` (parsed JSON) is a valid version-1 policy."""
    import jsonschema

    _check_finite(document)
    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        message = error.message
        if error.validator in ("type", "enum", "const", "minimum", "maximum"):
            # jsonschema prints the whole instance; keep the line short but keep the bad value.
            message = f"{_short(error.instance)} is invalid: expected " + {
                "type": f"type {error.validator_value!r}",
                "enum": f"one of {error.validator_value}",
                "const": f"{error.validator_value!r}",
                "minimum": f"a value >= {error.validator_value}",
                "maximum": f"a value <= {error.validator_value}",
            }[error.validator]
        elif error.validator == "not" and error.absolute_path and "required" in error.validator_value:
            key = error.validator_value["required"][0]
            owner = {"scale": "'cfg', 'edit', 'text' or 'joint'", "image_scale": "'edit'"}.get(key, "'affine'")
            message = f"{key!r} is only allowed on {owner} steps, not on {_short(error.instance.get('op'))}"
        elif error.validator == "not":
            other = "rule" if document.get("kind") == "static" else "steps"
            message = f"a {document.get('kind')} policy must not have '{other}'"
        elif error.validator == "oneOf" and list(error.absolute_path) == ["rule"]:
            message = "give either 'threshold' (one for every step) or 'thresholds' (one per step), not both or neither"
        raise PolicyError(message, _pointer(error.absolute_path))
    # What the schema cannot say.
    T = document["num_inference_steps"]
    if isinstance(T, float):  # JSON Schema's "integer" admits 25.0
        raise PolicyError(f"{_short(T)} is invalid: expected an integer step count (no decimal point)",
                          "/num_inference_steps")
    steps = document.get("steps")
    if steps is not None and len(steps) != document["num_inference_steps"]:
        raise PolicyError(
            f"{len(steps)} steps listed but num_inference_steps is {document['num_inference_steps']}",
            "/steps",
        )
    conditions = document.get("conditions", 1)
    _check_conditions(document, conditions)
    if steps is not None and conditions == 1:
        step_costs(steps)  # affine coefficients and fallbacks
    rule = document.get("rule") or {}
    for key in ("thresholds", "scales", "stop_scales"):
        if key in rule and len(rule[key]) != document["num_inference_steps"]:
            raise PolicyError(f"{len(rule[key])} {key} listed but num_inference_steps is "
                              f"{document['num_inference_steps']} (one per step)", f"/rule/{key}")
    axis = document.get("axis", "steps")
    if axis == "tokens":
        for i, step in enumerate(steps or []):
            if step["op"] not in ("cfg", "cond"):
                raise PolicyError(f"{step['op']!r} is not a token op: a token policy runs 'cfg' or 'cond' at each token",
                                  f"/steps/{i}/op")
        if rule and rule["rule"] != "token_divergence":
            raise PolicyError(f"{rule['rule']!r} is a diffusion rule; a token policy's rule is 'token_divergence'",
                              "/rule/rule")
    elif rule and rule["rule"] == "token_divergence":
        raise PolicyError("'token_divergence' is a rule over tokens: give the policy \"axis\": \"tokens\"", "/rule/rule")
    if steps is not None and "nfe" in document:
        expected = token_nfe(steps) if axis == "tokens" else policy_nfe(steps, conditions)
        if document["nfe"] != expected:
            raise PolicyError(f"{_short(document['nfe'])} does not match the steps, which cost {expected}", "/nfe")


def _check_conditions(document: dict, conditions: int) -> None:
    """A two-condition (editing) policy has only two-condition ops and an image scale; a
    one-condition policy has neither."""
    steps, rule = document.get("steps") or [], document.get("rule") or {}
    if conditions == 2:
        if "image_guidance_scale" not in document:
            raise PolicyError("a two-condition policy needs 'image_guidance_scale' (s_I)", "")
        if document.get("axis", "steps") != "steps":
            raise PolicyError("a two-condition policy runs over a sampler's steps, not tokens", "/axis")
        for i, step in enumerate(steps):
            if step["op"] not in EDIT_OP_NFE:
                raise PolicyError(f"{step['op']!r} is a one-condition op; a two-condition policy runs "
                                  f"{', '.join(map(repr, EDIT_OP_NFE))}", f"/steps/{i}/op")
        if rule and rule["rule"] != "ag_cosine":
            raise PolicyError(f"{rule['rule']!r} is not a two-condition rule; use 'ag_cosine'", "/rule/rule")
        for key in ("scales", "stop_scales"):
            if key in rule:
                raise PolicyError(f"{key!r} is not supported on a two-condition rule", f"/rule/{key}")
        return
    if "image_guidance_scale" in document:
        raise PolicyError("'image_guidance_scale' belongs to a two-condition policy: give it \"conditions\": 2", "")
    for i, step in enumerate(steps):
        if step["op"] in ("edit", "text", "joint"):
            raise PolicyError(f"{step['op']!r} is a two-condition (image editing) op: give the policy "
                              f"\"conditions\": 2", f"/steps/{i}/op")


def policy_nfe(steps: list[dict], conditions: int = 1) -> int:
    """Denoiser evaluations per sample of a static diffusion policy."""
    return sum(EDIT_OP_NFE[s["op"]] for s in steps) if conditions == 2 else sum(step_costs(steps))


def token_nfe(steps: list[dict]) -> int:
    """Forward passes per sample of a static token policy: one conditional pass per token, plus the
    unconditional stream's positions up to the last guided token (all of them: a stream that skips
    positions computes them when it resumes, so its key/value cache stays exact)."""
    guided = [i for i, step in enumerate(steps) if step["op"] == "cfg"]
    return len(steps) + (guided[-1] + 1 if guided else 0)


def step_costs(steps: list[dict]) -> list[int]:
    """NFE of each step of a static policy (all samples alike), checking ``affine`` steps: their
    coefficients, and that each one either has the previous step's estimates it needs or says
    what to fall back to. Raises :class:`PolicyError` at the offending step."""
    from agsearch.linear_ag import AffineError, check_coef, needs_past

    costs = []
    channels = None
    have_c = have_u = False  # did the previous step provide ε_c(t−1) and ε_u(t−1)?
    for i, step in enumerate(steps):
        op = step["op"]
        if op != "affine":
            costs.append(OP_NFE[op])
            have_c, have_u = op in ("cfg", "cond"), op in ("cfg", "uncond")
            continue
        try:
            ch = check_coef(step["coef"], "coef")
        except AffineError as e:
            raise PolicyError(str(e).removeprefix("coef").lstrip(": /") or str(e), f"/steps/{i}/coef") from None
        if ch is not None and channels is not None and ch != channels:
            raise PolicyError(f"{ch} per-channel coefficients, but an earlier affine step has {channels}", f"/steps/{i}/coef")
        channels = ch if ch is not None else channels
        fallback = step.get("fallback")
        if not needs_past(step["coef"]) or (have_c and have_u):
            costs.append(OP_NFE["affine"])
            have_c = have_u = True
        elif fallback is None:
            why = "it is the first step" if i == 0 else f"step {i - 1} ({steps[i - 1]['op']}) does not provide them"
            raise PolicyError(
                f"affine step needs the previous step's conditional and unconditional estimates, but {why}; "
                f"give it a 'fallback' (cond or cfg) or set its eps_c_prev and eps_u_prev coefficients to 0",
                f"/steps/{i}",
            )
        else:
            costs.append(OP_NFE[fallback])
            have_c, have_u = True, fallback == "cfg"
    return costs


@dataclass
class Policy:
    """A guidance policy: a static list of per-step ops, or an adaptive rule.

    ``steps`` items are ``{"op": "cfg", "scale": 1.5}``, ``{"op": "cond"}`` or ``{"op": "uncond"}``
    (a ``cfg`` step without ``scale`` uses ``guidance_scale``). ``rule`` is e.g.
    ``{"rule": "ag_cosine", "space": "x0", "threshold": 0.99}``.
    """

    kind: str
    num_inference_steps: int
    guidance_scale: float
    steps: list[dict] | None = None
    rule: dict | None = None
    name: str | None = None
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    axis: str = "steps"  # "tokens": over an AR model's token positions
    conditions: int = 1  # 2: an image editor's image and text (ops edit, text, joint, cond)
    image_guidance_scale: float | None = None  # conditions 2: s_I

    def __post_init__(self):
        validate(self._document())

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def static(cls, ops: list[str | dict], guidance_scale: float, **kwargs) -> "Policy":
        """A static policy from op names or step dicts, one per sampling step."""
        steps = [{"op": op} if isinstance(op, str) else dict(op) for op in ops]
        return cls("static", len(steps), guidance_scale, steps=steps, **kwargs)

    @classmethod
    def adaptive(cls, num_inference_steps: int, guidance_scale: float, threshold: float | list[float],
                 space: str = "x0", scales: list[float] | None = None, stop_scales: list[float] | None = None,
                 **kwargs) -> "Policy":
        """The Adaptive Guidance rule: per sample, CFG until cos(cond, uncond) in ``space`` reaches
        ``threshold`` — one number (AG), or a list of one threshold per step (a searched rule) —
        then ``cond`` for good. ``scales``: optional per-step guidance scales while guiding;
        ``stop_scales``: optional per-step scales of the step at which a sample stops (default
        the step's guided scale)."""
        rule = {"rule": "ag_cosine", "space": space}
        if isinstance(threshold, (list, tuple)):
            rule["thresholds"] = [float(v) for v in threshold]
        else:
            rule["threshold"] = threshold
        if scales is not None:
            rule["scales"] = [float(v) for v in scales]
        if stop_scales is not None:
            rule["stop_scales"] = [float(v) for v in stop_scales]
        return cls("adaptive", num_inference_steps, guidance_scale, rule=rule, **kwargs)

    @classmethod
    def from_dict(cls, document: Any, source: str | None = None) -> "Policy":
        try:
            validate(document)
        except PolicyError as e:
            raise PolicyError(e.reason, e.pointer, source) from None
        return cls(
            kind=document["kind"],
            num_inference_steps=document["num_inference_steps"],
            guidance_scale=document["guidance_scale"],
            steps=[dict(s) for s in document["steps"]] if "steps" in document else None,
            rule=dict(document["rule"]) if "rule" in document else None,
            name=document.get("name"),
            provenance=dict(document.get("provenance", {})),
            metrics=dict(document.get("metrics", {})),
            axis=document.get("axis", "steps"),
            conditions=document.get("conditions", 1),
            image_guidance_scale=document.get("image_guidance_scale"),
        )

    @classmethod
    def loads(cls, text: str, source: str | None = None) -> "Policy":
        def no_constants(name):
            raise PolicyError(f"invalid JSON: {name} is not allowed", source=source)

        try:
            document = json.loads(text, parse_constant=no_constants)
        except json.JSONDecodeError as e:
            raise PolicyError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", source=source) from None
        except RecursionError:
            raise PolicyError("invalid JSON: nested too deeply", source=source) from None
        except ValueError as e:  # an integer of more digits than Python converts (4300)
            reason = "a number has more than 4300 digits" if "digits" in str(e) else str(e).split(";")[0]
            raise PolicyError(f"invalid JSON: {reason}", source=source) from None
        return cls.from_dict(document, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        """Read and validate a policy file."""
        path = Path(path)

        def unreadable(message):  # read_text_file's message starts with the path: PolicyError adds it
            return PolicyError(message.removeprefix(f"{path}: "), source=str(path))

        return cls.loads(read_text_file(path, "policy file", unreadable, MAX_POLICY_BYTES), str(path))

    # -- serialisation --------------------------------------------------------------------------
    def _document(self) -> dict:
        doc: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        if self.name is not None:
            doc["name"] = self.name
        doc["kind"] = self.kind
        if self.axis != "steps":
            doc["axis"] = self.axis
        if self.conditions != 1:
            doc["conditions"] = self.conditions
        doc.update(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale)
        if self.image_guidance_scale is not None:
            doc["image_guidance_scale"] = self.image_guidance_scale
        if self.steps is not None:
            doc["steps"] = self.steps
            try:
                doc["nfe"] = token_nfe(self.steps) if self.axis == "tokens" else policy_nfe(self.steps, self.conditions)
            except (PolicyError, KeyError, TypeError, AttributeError):  # validate() reports it
                costs = EDIT_OP_NFE if self.conditions == 2 else OP_NFE
                doc["nfe"] = sum(costs[s.get("op")] for s in self.steps if isinstance(s, dict) and s.get("op") in costs)
        if self.rule is not None:
            doc["rule"] = self.rule
        doc["provenance"] = self.provenance
        doc["metrics"] = self.metrics
        return doc

    def to_dict(self) -> dict:
        validate(doc := json.loads(json.dumps(self._document())))
        return doc

    def dumps(self) -> str:
        """Indented JSON with one line per step, so a policy reads top to bottom."""
        doc = self.to_dict()
        steps = doc.pop("steps", None)
        text = json.dumps(doc, indent=2, ensure_ascii=False)
        if steps is not None:
            lines = ",\n".join("    " + json.dumps(s, ensure_ascii=False) for s in steps)
            head, _, tail = text.partition('\n  "provenance"')
            text = f'{head}\n  "steps": [\n{lines}\n  ],\n  "provenance"{tail}'
        return text + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy as JSON, atomically (a temporary file renamed into place)."""
        return atomic_write_text(path, self.dumps())

    # -- queries --------------------------------------------------------------------------------
    @property
    def nfe(self) -> int | None:
        """Denoiser evaluations per sample; ``None`` for an adaptive policy (it varies per sample)."""
        if self.kind != "static":
            return None
        return token_nfe(self.steps) if self.axis == "tokens" else policy_nfe(self.steps, self.conditions)

    @property
    def max_nfe(self) -> int:
        return self.nfe if self.nfe is not None else (self.conditions + 1) * self.num_inference_steps

    def scale_at(self, i: int) -> float:
        """The guidance scale of a ``cfg`` step ``i`` (of a guided step ``i`` of an adaptive rule)."""
        if self.steps:
            return float(self.steps[i].get("scale", self.guidance_scale))
        if self.rule and "scales" in self.rule:
            return float(self.rule["scales"][i])
        return float(self.guidance_scale)

    def image_scale_at(self, i: int) -> float:
        """A two-condition policy's image scale s_I at an ``edit`` step ``i`` (at every guided step of
        its adaptive rule)."""
        if self.steps:
            return float(self.steps[i].get("image_scale", self.image_guidance_scale))
        return float(self.image_guidance_scale)

    def require_conditions(self, conditions: int, what: str) -> "Policy":
        """This policy, if it guides on ``conditions`` conditions (1: text or class; 2: an image
        editor's image and text); :class:`PolicyError` naming ``what`` runs it otherwise."""
        if self.conditions != conditions:
            have = "a two-condition (image editing) policy" if self.conditions == 2 else "a one-condition policy"
            need = "two conditions (\"conditions\": 2)" if conditions == 2 else "one condition"
            raise PolicyError(f"{have} cannot run on {what}, which guides on {need}", "/conditions")
        return self

    def stop_scale_at(self, i: int) -> float:
        """An adaptive rule's scale at step ``i`` for a sample that stops guiding there (its γ
        reached θ_i after both passes ran): ``stop_scales`` if given, else the guided scale."""
        if self.rule and "stop_scales" in self.rule:
            return float(self.rule["stop_scales"][i])
        return self.scale_at(i)

    def threshold_at(self, i: int) -> float:
        """An adaptive rule's threshold θ_i at step ``i``."""
        if "thresholds" in self.rule:
            return float(self.rule["thresholds"][i])
        return float(self.rule["threshold"])

    def ops_string(self) -> str:
        """One letter per step: C = cfg, c = cond, u = uncond, A = affine; E = edit, T = text, J = joint
        ("" for an adaptive policy)."""
        letters = {"cfg": "C", "cond": "c", "uncond": "u", "affine": "A", "edit": "E", "text": "T", "joint": "J"}
        return "".join(letters[s["op"]] for s in self.steps or [])

    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "adaptive" and self.rule["rule"] == "token_divergence":
            r = self.rule
            return f"{r['measure']}-{r['threshold']:g}-p{r.get('patience', 1)}" + (f"-w{r['warmup']}" if r.get("warmup") else "")
        if self.kind == "adaptive":
            space = self.rule.get("space", "x0")
            return f"ag-{space}-{self.rule['threshold']:g}" if "threshold" in self.rule else f"ag-{space}-per-step"
        return self.ops_string()

    def resample(self, num_inference_steps: int) -> "Policy":
        """The same policy for another step count: new step j takes the op of the old step at the
        same position in [0, 1] (its midpoint ``(j + 0.5) / T_new``)."""
        if num_inference_steps < 1:
            raise PolicyError(f"cannot resample to {num_inference_steps} steps", "/num_inference_steps")
        provenance = {**self.provenance, "resampled_from": self.num_inference_steps}
        old = self.num_inference_steps

        def remap(items: list) -> list:
            return [copy.deepcopy(items[min(old - 1, int((j + 0.5) * old / num_inference_steps))])
                    for j in range(num_inference_steps)]

        steps = remap(self.steps) if self.steps is not None else None
        rule = dict(self.rule) if self.rule else None
        for key in ("thresholds", "scales", "stop_scales"):
            if rule and key in rule:
                rule[key] = remap(rule[key])
        return Policy(self.kind, num_inference_steps, self.guidance_scale, steps=steps, rule=rule, name=self.name,
                      provenance=provenance, metrics={}, axis=self.axis, conditions=self.conditions,
                      image_guidance_scale=self.image_guidance_scale)

    def require_axis(self, axis: str) -> "Policy":
        """This policy, if it is over ``axis`` ("steps": a diffusion sampler; "tokens": an AR
        model); :class:`PolicyError` otherwise."""
        if self.axis != axis:
            raise PolicyError(
                "a token policy (axis 'tokens', for the AR model) cannot run on a diffusion sampler" if axis == "steps"
                else "a diffusion policy cannot run over an AR model's tokens: token policies have \"axis\": \"tokens\"",
                "/axis")
        return self

    def for_steps(self, num_inference_steps: int, resample: bool = False, axis: str = "steps") -> "Policy":
        """This policy for a sampler that runs ``num_inference_steps`` (over ``axis``): refused on
        another axis, and on a mismatch unless ``resample`` is asked for."""
        self.require_axis(axis)
        if num_inference_steps == self.num_inference_steps:
            return self
        if not resample:
            raise PolicyError(
                f"policy has {self.num_inference_steps} {'tokens' if axis == 'tokens' else 'steps'} but the "
                f"{'model generates' if axis == 'tokens' else 'sampler runs'} {num_inference_steps}; "
                f"ask to resample it (--resample) to map {axis} by position",
                "/num_inference_steps",
            )
        return self.resample(num_inference_steps)


def load_policies(paths, steps: int, conditions: int, what: str, resample: bool = False) -> list[Policy]:
    """The policy files ``paths``, each checked to guide on ``conditions`` conditions (``what`` names
    the model) and fitted to ``steps`` steps, all before any sampling; a :class:`PolicyError` names
    the file."""
    policies = []
    for path in paths:
        policy = Policy.load(path)
        try:
            policies.append(policy.require_conditions(conditions, what).for_steps(steps, resample))
        except PolicyError as e:
            raise PolicyError(e.reason, e.pointer, str(path)) from None
    return policies
