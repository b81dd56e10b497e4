"""Property-based hostile input (hypothesis), per CLI command.

Each property draws option values or file contents an adversary might give and asserts the contract
of every refusal: exit code 2, one line on stderr naming the option or file, no traceback, nothing
written. What is not refused must be legitimately valid: it reaches the command's work (stubbed
here with :class:`Reached`, so no property samples or trains) with values inside the documented
limits, or, for the cheap commands (``show``, ``baseline``), runs to the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agsearch.cli import main
from agsearch.cli.main import MAX_IMAGE_SIDE, MAX_SAMPLES, MAX_SEED
from agsearch.policy import MAX_SCALE, MAX_STEPS

# AGSEARCH_EXAMPLES=500 explores further than the default run's 40 (12 for the LightningCLI commands).
EXAMPLES = int(os.environ.get("AGSEARCH_EXAMPLES", "40"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=max(1, EXAMPLES * 3 // 10), deadline=None, suppress_health_check=[HealthCheck.too_slow])

POLICY = {"format": "agsearch.policy", "version": 1, "kind": "static", "num_inference_steps": 3,
          "guidance_scale": 1.5, "steps": [{"op": "cfg"}, {"op": "cfg", "scale": 2.0}, {"op": "cond"}]}


class Reached(BaseException):
    """Raised by the stubbed work of a command: the input got past every check. A BaseException, so
    that no ``except Exception`` in the code under test can swallow it."""

    def __init__(self, **values):
        super().__init__("reached the command's work")
        self.values = values


def run(argv: list[str]) -> tuple[int | Reached, str]:
    """(exit code or the :class:`Reached` it raised, stderr) of the CLI run in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except Reached as reached:
            code = reached
    return code, err.getvalue()


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_refused(code, err: str, *needles: str) -> None:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, err)


# -- what an adversary types where a value is expected ----------------------------------------------------------
numbers_as_text = st.one_of(
    st.integers(-10**30, 10**30).map(str),
    st.integers(-5, 5000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-5, 5000).map(lambda v: f"{v:.3g}"),
    st.sampled_from(["", " ", "1e400", "-0", "0x10", "1_000", "٣", "nan", "-inf", "1.5.2", "9" * 5000, "\x00"]),
)
hostile_text = st.one_of(numbers_as_text, st.text(max_size=24))


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@pytest.fixture(scope="module")
def policy_file(folder):
    path = folder / "policy.json"
    path.write_text(json.dumps(POLICY))
    return str(path)


# -- show: any document either loads (and then the sampler runs it) or is one line ----------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
STEP_FIELDS = ["op", "scale", "coef", "fallback"]
COEF = {"eps_c": 1.0, "eps_c_prev": 0.0, "eps_u_prev": 0.0, "x": 0.0, "bias": 0.0}


@st.composite
def mutated_policies(draw):
    """A valid policy with one to three fields replaced, added or removed, anywhere in it."""
    doc = json.loads(json.dumps(draw(st.sampled_from([
        POLICY,
        {**POLICY, "steps": [{"op": "cfg"}, {"op": "affine", "coef": dict(COEF)}, {"op": "uncond"}]},
        {"format": "agsearch.policy", "version": 1, "kind": "adaptive", "num_inference_steps": 3,
         "guidance_scale": 2.0, "rule": {"rule": "ag_cosine", "threshold": 0.9, "stop_scales": [1.5, 1.0, 1.0]}},
    ]))))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "step", "rule", "coef"]))
        if where == "top":
            target = doc
            key = draw(st.sampled_from(["format", "version", "kind", "num_inference_steps", "guidance_scale",
                                        "steps", "rule", "nfe", "name", "extra"]))
        elif where == "step" and isinstance(doc.get("steps"), list) and doc["steps"]:
            target = doc["steps"][draw(st.integers(0, len(doc["steps"]) - 1))]
            key = draw(st.sampled_from(STEP_FIELDS))
        elif where == "rule" and isinstance(doc.get("rule"), dict):
            target = doc["rule"]
            key = draw(st.sampled_from(["rule", "space", "threshold", "thresholds", "scales", "stop_scales"]))
        elif where == "coef":
            steps = doc.get("steps") if isinstance(doc.get("steps"), list) else []
            affine = [s for s in steps if isinstance(s, dict) and isinstance(s.get("coef"), dict)]
            if not affine:
                continue
            target = affine[0]["coef"]
            key = draw(st.sampled_from(sorted(COEF)))
        else:
            continue
        if not isinstance(target, dict):
            continue
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(st.one_of(
                json_values,
                st.floats(-1e9, 1e9),
                st.integers(0, 2000),
                st.lists(st.floats(-200, 200), min_size=1, max_size=4),
                st.sampled_from(["cfg", "cond", "uncond", "affine", "static", "adaptive", "x0", "eps", 25.0, 1e308]),
            ))
    return doc


@PROPERTY
@given(document=mutated_policies())
def test_show_either_accepts_a_policy_the_sampler_runs_or_refuses_it_in_one_line(document, folder, denoiser_1ch):
    from agsearch.diffusers.schedulers import make_scheduler
    from agsearch.guidance.sampler import sample
    from agsearch.models.digits import SCHEDULER_CONFIG
    from agsearch.policy import Policy

    path = folder / "mutated.json"
    path.write_text(json.dumps(document))
    code, err = run(["show", str(path)])
    event("refused" if code else "accepted")
    if code != 0:
        assert_refused(code, err, str(path))
        return
    policy = Policy.load(path)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = sample(denoiser_1ch, make_scheduler("ddim", SCHEDULER_CONFIG), policy, noise,
                     torch.tensor([1, 2]))
    assert out.samples.shape == noise.shape
    assert torch.isfinite(out.samples).all(), document
    if policy.kind == "static":
        assert out.nfe.tolist() == [policy.nfe] * 2


@PROPERTY
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_show_refuses_arbitrary_bytes_in_one_line(content, folder):
    path = folder / "bytes.json"
    path.write_bytes(content)
    code, err = run(["show", str(path)])
    if code != 0:
        assert_refused(code, err, str(path))


# -- baseline: cheap, so run to the end ------------------------------------------------------------------------
BASELINE_OPTIONS = {  # option: the baseline that reads it
    "--steps": "cutoff", "--scale": "cfg", "--fraction": "cutoff", "--start": "interval", "--stop": "interval",
    "--threshold": "ag",
}


@PROPERTY
@given(option=st.sampled_from(sorted(BASELINE_OPTIONS)), value=hostile_text)
def test_baseline_writes_a_valid_policy_or_refuses_and_writes_nothing(option, value, folder):
    from agsearch.policy import Policy

    out = folder / "baseline" / "p.json"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    argv = ["baseline", BASELINE_OPTIONS[option], f"{option}={value}", "--out", str(out)]
    if option != "--fraction" and BASELINE_OPTIONS[option] == "cutoff":
        argv.insert(2, "--fraction=0.5")
    code, err = run(argv)
    event("refused" if code else "accepted")
    if code == 0:
        policy = Policy.load(out)  # what baseline writes, show and the sampler accept
        assert 1 <= policy.num_inference_steps <= MAX_STEPS and 0 <= policy.guidance_scale <= MAX_SCALE
    else:
        assert_refused(code, err, option.strip("-"))
        assert not out.exists() and listing(out.parent) == []


# -- eval, generate, fit-affine, sweep, bench: refused, or the work starts with values in range -----------------
def stub(monkeypatch, target: str, name: str):
    """Make ``target.name`` raise :class:`Reached` with its arguments."""
    import importlib

    def reached(*args, **kwargs):
        raise Reached(args=args, **kwargs)

    monkeypatch.setattr(importlib.import_module(target), name, reached)


def in_limits(values: dict) -> None:
    for key in ("samples", "batch_size", "pairs", "heldout"):
        if key in values:
            assert 1 <= values[key] <= MAX_SAMPLES, (key, values[key])
    for key in ("seed", "heldout_seed"):
        if key in values:
            assert 0 <= values[key] <= MAX_SEED, (key, values[key])
    if "device" in values:
        torch.empty(1, device=values["device"])  # exists here


EVAL_OPTIONS = ["--samples", "--batch-size", "--steps", "--seed", "--device", "--scheduler", "--model", "--captions"]


@PROPERTY
@given(option=st.sampled_from(EVAL_OPTIONS), value=hostile_text)
def test_eval_refuses_before_any_sampling_or_starts_with_values_in_range(option, value, folder, policy_file):
    with pytest.MonkeyPatch.context() as mp:
        stub(mp, "agsearch.eval", "evaluator_for")
        out = folder / "eval" / "records.json"
        out.parent.mkdir(exist_ok=True)
        code, err = run(["eval", "--policy", policy_file, "--resample", f"{option}={value}", "--json", str(out)])
    event("reached the work" if isinstance(code, Reached) else "refused")
    if isinstance(code, Reached):
        in_limits(code.values)
    else:
        assert_refused(code, err, option.strip("-").split("-")[0])
    assert listing(out.parent) == []


GENERATE_OPTIONS = ["--height", "--width", "--steps", "--scale", "--seed", "--device", "--dtype", "--prompt",
                    "--negative-prompt", "--pipeline"]


@PROPERTY
@given(option=st.sampled_from(GENERATE_OPTIONS), value=hostile_text)
def test_generate_refuses_before_loading_the_pipeline_or_accepts_any_prompt(option, value, folder, policy_file):
    with pytest.MonkeyPatch.context() as mp:
        stub(mp, "agsearch.diffusers.generate", "load_pipeline")
        out = folder / "generate" / "x.png"
        out.parent.mkdir(exist_ok=True)
        argv = ["generate", "--pipeline", "builtin:shapes", "--policy", policy_file, "--prompt", "a red circle",
                f"{option}={value}", "--out", str(out)]
        code, err = run(argv)
    event("reached the work" if isinstance(code, Reached) else "refused")
    if option == "--prompt" and not value.strip():
        assert_refused(code, err, "prompt is empty")  # most likely an unset shell variable
    elif option in ("--prompt", "--negative-prompt"):
        assert isinstance(code, Reached), err  # generation accepts any prompt
    elif isinstance(code, Reached):
        assert option != "--pipeline" or value == "builtin:shapes" or Path(value).is_dir()
    else:
        assert_refused(code, err, option.strip("-").split("-")[0] if option != "--pipeline" else "")
    assert listing(out.parent) == []


OTHER_COMMANDS = {
    "fit-affine": (["--out", "{out}"], ["--pairs", "--heldout", "--seed", "--heldout-seed", "--ridge", "--device"],
                   ("agsearch.linear_ag_fit", "fit_builtin")),
    "sweep": (["--out-dir", "{dir}"], ["--budgets", "--samples", "--batch-size", "--seed", "--spaces"],
              ("agsearch.search.sweep", "run_sweep")),
    "bench": (["--out-dir", "{dir}"], ["--samples", "--batch-size", "--seed", "--device", "--model"],
              ("agsearch.eval.bench", "run_benchmark")),
}


@PROPERTY
@given(command=st.sampled_from(sorted(OTHER_COMMANDS)), data=st.data())
def test_long_commands_refuse_before_any_work_or_start_with_values_in_range(command, data, folder):
    fixed, options, (module, function) = OTHER_COMMANDS[command]
    option, value = data.draw(st.sampled_from(options)), data.draw(hostile_text)
    where = folder / command
    where.mkdir(exist_ok=True)
    argv = [command, *(a.format(out=where / "out.json", dir=where / "out") for a in fixed), f"{option}={value}"]
    with pytest.MonkeyPatch.context() as mp:
        stub(mp, module, function)
        code, err = run(argv)
    event("reached the work" if isinstance(code, Reached) else "refused")
    if isinstance(code, Reached):
        in_limits(code.values)
    else:
        assert_refused(code, err, option.strip("-").split("-")[0])
    assert listing(where) == []


# -- export: any file as a checkpoint --------------------------------------------------------------------------
checkpoint_payloads = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["state_dict", "hyper_parameters", "epoch", "x"]), json_values, max_size=3),
    st.fixed_dictionaries({
        "state_dict": st.dictionaries(st.sampled_from(["gate_logits", "other"]),
                                      st.lists(st.integers(1, 6), min_size=0, max_size=3).map(
                                          lambda shape: torch.zeros(shape)), max_size=2),
        "hyper_parameters": st.fixed_dictionaries({}, optional={
            "space": st.sampled_from(["minimal", "cfg_scales", "nosuch", 3]),
            "num_inference_steps": st.integers(-2, 30) | st.floats(allow_nan=True),
            "budget": st.integers(-5, 80) | st.floats(allow_nan=True) | st.none(),
            "guidance_scale": st.floats(allow_nan=True, allow_infinity=True)}),
    }),
)


@pytest.fixture(scope="module")
def real_checkpoint():
    """What a search of the minimal space (5 steps, budget 7) saves, without training it."""
    from agsearch.search.modules import search_module

    module = search_module(model="digits", space="minimal", num_inference_steps=5, budget=7)
    return {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3,
            "datamodule_hyper_parameters": {"seed": 0}, "agsearch": {"search_seconds": 1.5, "schedule_steps": 4}}


hostile_values = st.one_of(
    json_values, st.integers(-10, 60), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), "minimal", "cfg_scales", "adaptive_cosine"]),
    st.lists(st.integers(0, 6), max_size=3).map(lambda shape: torch.zeros(shape)),
    st.sampled_from([float("nan"), float("inf"), -1e30]).map(lambda v: torch.full((5, 2), v)),
)


@st.composite
def damaged_checkpoints(draw, base):
    """A real checkpoint with up to two entries replaced or removed."""
    checkpoint = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for _ in range(draw(st.integers(0, 2))):
        section = draw(st.sampled_from(["state_dict", "hyper_parameters", "datamodule_hyper_parameters",
                                        "agsearch", "global_step"]))
        if section == "global_step" or not isinstance(checkpoint.get(section), dict):
            checkpoint[section] = draw(hostile_values)
            continue
        key = draw(st.sampled_from(sorted(checkpoint[section]) + ["extra"]))
        if draw(st.booleans()) and key in checkpoint[section]:
            del checkpoint[section][key]
        else:
            checkpoint[section][key] = draw(hostile_values)
    return checkpoint


@PROPERTY
@given(data=st.data(), budget=st.sampled_from([None, None, "7", "10"]) | st.integers(-10, 100).map(str))
def test_export_of_any_file_writes_a_valid_policy_or_refuses_in_one_line(data, budget, folder, real_checkpoint):
    from agsearch.policy import Policy

    payload = data.draw(checkpoint_payloads | damaged_checkpoints(real_checkpoint))
    where = folder / "export"
    where.mkdir(exist_ok=True)
    ckpt, out = where / "any.ckpt", where / "out" / "p.json"
    if isinstance(payload, bytes):
        ckpt.write_bytes(payload)
    else:
        torch.save(payload, ckpt)
    code, err = run(["export", str(ckpt), "--out", str(out), *(["--budget", budget] if budget else [])])
    event("exported" if code == 0 else "refused")
    if code == 0:
        Policy.load(out)
        out.unlink()
        out.parent.rmdir()
    else:
        assert_refused(code, err)
    assert listing(where) == ["any.ckpt"]


def test_export_blames_non_finite_gates_not_the_budget(folder, real_checkpoint):
    state = dict(real_checkpoint["state_dict"])
    state["gate_logits"] = torch.full_like(state["gate_logits"], float("nan"))
    ckpt, out = folder / "nan.ckpt", folder / "nan.json"
    torch.save({**real_checkpoint, "state_dict": state}, ckpt)
    code, err = run(["export", str(ckpt), "--out", str(out), "--budget", "7"])
    assert_refused(code, err, "gate_logits", "NaN or infinite")
    assert "budget" not in err and not out.exists()


# -- search and cca (LightningCLI): refused with no run directory, or the fit starts ----------------------------
SEARCH_OPTIONS = ["--model.num_inference_steps", "--model.budget", "--model.guidance_scale", "--model.lr",
                  "--model.temperature_start", "--model.entropy_weight", "--data.num_pairs", "--data.batch_size",
                  "--data.seed", "--data.num_val", "--eval.samples", "--eval.batch_size", "--eval.seed",
                  "--trainer.max_steps", "--model.space", "--model.scheduler", "--seed_everything"]
CCA_OPTIONS = ["--model.beta", "--model.lam", "--model.null_ratio", "--model.lr", "--data.batch_size",
               "--data.num_samples", "--eval.samples", "--eval.seed", "--trainer.max_steps"]


def sizes_in_limits(values: dict) -> None:
    from agsearch.cli.common import LIMITS

    data = values["datamodule"].hparams
    for option, (lo, hi) in LIMITS.items():
        section, _, name = option.partition(".")
        if section == "data" and name in data:
            assert lo <= data[name] <= hi, (option, data[name])
    assert -1 <= values["trainer"].max_steps <= LIMITS["trainer.max_steps"][1]


def _fit_reached(monkeypatch):
    import pytorch_lightning as pl

    def fit(trainer, module, *args, datamodule=None, **kwargs):
        raise Reached(module=module, trainer=trainer, datamodule=datamodule)

    monkeypatch.setattr(pl.Trainer, "fit", fit)


@FEW
@given(option=st.sampled_from(SEARCH_OPTIONS), value=numbers_as_text)
def test_search_refuses_with_no_run_directory_or_starts_to_fit(option, value, folder):
    root = folder / "search"
    root.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        _fit_reached(mp)
        code, err = run(["search", "--model.model=digits", f"{option}={value}", f"--trainer.default_root_dir={root}",
                         "--wandb.mode=disabled", "--progress=false"])
    event("reached the work" if isinstance(code, Reached) else "refused")
    if isinstance(code, Reached):
        module = code.values["module"]
        assert 1 <= module.hparams.num_inference_steps <= MAX_STEPS
        assert 0 <= module.hparams.guidance_scale <= MAX_SCALE
        sizes_in_limits(code.values)
        for run_dir in root.iterdir():  # a started run may keep its directory; clean up for the next example
            import shutil

            shutil.rmtree(run_dir)
    else:
        assert_refused(code, err, option.strip("-"))
    assert listing(root) == []


@FEW
@given(option=st.sampled_from(CCA_OPTIONS), value=numbers_as_text)
def test_cca_refuses_with_no_output_directory_or_starts_to_fit(option, value, folder):
    out = folder / "cca" / "run"
    out.parent.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        _fit_reached(mp)
        code, err = run(["cca", f"{option}={value}", f"--out={out}", "--wandb.mode=disabled", "--progress=false"])
    event("reached the work" if isinstance(code, Reached) else "refused")
    if isinstance(code, Reached):
        import shutil

        sizes_in_limits(code.values)
        shutil.rmtree(out, ignore_errors=True)
    else:
        assert_refused(code, err, option.strip("-"))
    assert listing(out.parent) == []


@pytest.fixture(scope="module")
def denoiser_1ch():
    from diffusers import UNet2DModel

    from agsearch.denoisers.class_conditional import ClassConditionalDenoiser
    from agsearch.models.digits.data import NULL_CLASS

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=NULL_CLASS + 1).requires_grad_(False).eval()
    return ClassConditionalDenoiser(unet, NULL_CLASS)


def test_the_limits_are_the_documented_ones():
    """docs/cli.md states every limit the code enforces, with its value."""
    from agsearch.cli.common import LIMITS
    from agsearch.linear_ag import MAX_COEF
    from agsearch.policy import MAX_POLICY_BYTES

    docs = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    assert f"at most {MAX_STEPS:,} sampling steps" in docs
    assert f"guidance scales in [0, {MAX_SCALE:g}]" in docs
    assert f"at most {MAX_SAMPLES:,} samples per evaluation" in docs
    assert f"image sides up to {MAX_IMAGE_SIDE:,} pixels" in docs
    assert f"(policies: {MAX_POLICY_BYTES // 2**20} MiB" in docs
    assert f"[-{MAX_COEF:g}, {MAX_COEF:g}]" in docs
    assert f"integer in [0, {MAX_SEED:,}]" in docs
    rows = docs.split("| option | range |")[1].split("\n\n")[0].splitlines()[2:]
    table = {line.split("|")[1]: line.split("|")[2].strip() for line in rows}
    for option, (lo, hi) in LIMITS.items():
        row = next((r for names, r in table.items() if f"`--{option}`" in names), None)
        assert row is not None, f"{option} is not in docs/cli.md's table of limits"
        assert f"{hi:,}" in row and (lo in (0, 1, -1) and str(lo) in row), (option, row)
