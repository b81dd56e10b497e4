"""Searched adaptive policies (per-step thresholds): the policy file, the sampler's rule, the
tables the search trains on, the relaxation, calibration and the ``adaptive_cosine`` search."""

import json
import os
import subprocess
import sys

import pytest
import torch

from agsearch.cli import main
from agsearch.guidance.sampler import Resume, sample
from agsearch.models.digits.data import IMAGE_SHAPE
from agsearch.policy import Policy, PolicyError
from agsearch.search.space import SearchSpace, SpaceError
from agsearch.search.thresholds import (
    STOP_PROBE,
    calibrate,
    from_u,
    guided_steps,
    hard_outcome,
    soft_outcome,
    stop_distribution,
    tabulate,
    to_u,
)
from agsearch.seeds import make_noise, sample_seeds

T, W = 6, 3.0  # a large scale on the random UNet, so that guidance matters


def noise_and_labels(n=8, seed=5):
    return make_noise(sample_seeds(seed, n), IMAGE_SHAPE), torch.arange(n) % 10


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- policy file ------------------------------------------------------------------------------------
def test_per_step_thresholds_round_trip(tmp_path):
    policy = Policy.adaptive(4, 1.5, [0.9, 0.95, 1.0, -1.0], scales=[1.5, 2.0, 2.0, 1.0])
    loaded = Policy.load(policy.save(tmp_path / "p.json"))
    assert loaded.rule == policy.rule and [loaded.threshold_at(i) for i in range(4)] == [0.9, 0.95, 1.0, -1.0]
    assert loaded.scale_at(1) == 2.0 and loaded.label() == "ag-x0-per-step" and loaded.nfe is None
    resampled = loaded.resample(8)
    assert resampled.rule["thresholds"] == [0.9, 0.9, 0.95, 0.95, 1.0, 1.0, -1.0, -1.0]
    assert len(resampled.rule["scales"]) == 8
    stopping = Policy.adaptive(4, 1.5, [0.9, 0.95, 1.0, -1.0], stop_scales=[1.5, 2.5, 1.0, 1.5])
    loaded = Policy.load(stopping.save(tmp_path / "s.json"))
    assert [loaded.stop_scale_at(i) for i in range(4)] == [1.5, 2.5, 1.0, 1.5] and policy.stop_scale_at(1) == 2.0
    assert len(loaded.resample(8).rule["stop_scales"]) == 8


@pytest.mark.parametrize("rule, pointer, fragment", [
    ({"thresholds": [0.9, 0.9, 0.9]}, "/rule/thresholds", "3 thresholds listed but num_inference_steps is 4"),
    ({"thresholds": [0.9, 0.9, 1.5, 0.9]}, "/rule/thresholds/2", "1.5 is invalid: expected a value <= 1"),
    ({"thresholds": [0.9, -2, 0.9, 0.9]}, "/rule/thresholds/1", "expected a value >= -1"),
    ({"thresholds": [0.9, 0.9, 0.9, "x"]}, "/rule/thresholds/3", "expected type 'number'"),
    ({"threshold": 0.9, "thresholds": [0.9] * 4}, "/rule", "either 'threshold'"),
    ({}, "/rule", "either 'threshold'"),
    ({"threshold": 0.9, "scales": [1.0] * 5}, "/rule/scales", "5 scales listed"),
    ({"threshold": 0.9, "stop_scales": [1.0] * 3}, "/rule/stop_scales", "3 stop_scales listed"),
    ({"threshold": 0.9, "stop_scales": [1.0, -1.0, 1.0, 1.0]}, "/rule/stop_scales/1", "expected a value >= 0"),
])
def test_bad_thresholds_name_the_field(rule, pointer, fragment):
    document = {"format": "agsearch.policy", "version": 1, "kind": "adaptive", "num_inference_steps": 4,
                "guidance_scale": 1.5, "rule": {"rule": "ag_cosine", **rule}}
    with pytest.raises(PolicyError) as e:
        Policy.from_dict(document)
    assert e.value.pointer == pointer and fragment in str(e.value)


def test_non_finite_threshold_is_refused():
    with pytest.raises(PolicyError, match="not a finite number"):
        Policy.adaptive(3, 1.5, [0.9, float("nan"), 0.9])


def test_bad_threshold_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "agsearch.policy", "version": 1, "kind": "adaptive", "num_inference_steps": 25,
                               "guidance_scale": 1.1, "rule": {"rule": "ag_cosine", "thresholds": [0.9] * 24}}))
    code, out, err = run_cli(capsys, "eval", "--policy", bad, "--samples", "4")
    assert code == 2 and err.count("\n") == 1 and "/rule/thresholds" in err and "24 thresholds" in err


# -- the rule in the sampler --------------------------------------------------------------------------
def test_constant_thresholds_are_ag_and_a_step_function_is_a_cutoff(denoiser, scheduler):
    noise, labels = noise_and_labels()
    ag = sample(denoiser, scheduler, Policy.adaptive(T, W, 0.5), noise, labels)
    listed = sample(denoiser, scheduler, Policy.adaptive(T, W, [0.5] * T), noise, labels)
    assert torch.equal(ag.samples, listed.samples) and torch.equal(ag.nfe, listed.nfe)
    k = 3  # θ = 1 before step k − 1, −1 there: every sample guides exactly k steps
    step = sample(denoiser, scheduler, Policy.adaptive(T, W, [1.0] * (k - 1) + [-1.0] * (T - k + 1)), noise, labels)
    cutoff = sample(denoiser, scheduler, Policy.static(["cfg"] * k + ["cond"] * (T - k), W), noise, labels)
    assert torch.allclose(step.samples, cutoff.samples, rtol=1e-5, atol=1e-5) and bool((step.nfe == T + k).all())


def test_per_step_scales_apply_while_guiding(denoiser):
    from agsearch.diffusers.schedulers import make_scheduler
    from agsearch.models.digits import SCHEDULER_CONFIG

    scheduler = make_scheduler("ddim", SCHEDULER_CONFIG)
    noise, labels = noise_and_labels()
    scales = [W, 2.0, W, 1.5, W, W]
    never = Policy.adaptive(T, W, 1.0, scales=scales)  # never stops: CFG at the per-step scales
    static = Policy.static([{"op": "cfg", "scale": s} for s in scales], W)
    assert torch.allclose(sample(denoiser, scheduler, never, noise, labels).samples,
                          sample(denoiser, scheduler, static, noise, labels).samples, atol=1e-6)


def test_stop_scale_applies_at_the_step_where_a_sample_stops(denoiser, scheduler):
    noise, labels = noise_and_labels()
    k = 3  # every sample stops at step k − 1, which then runs CFG at its stop scale 1.7
    rule = Policy.adaptive(T, W, [1.0] * (k - 1) + [-1.0] * (T - k + 1), stop_scales=[W] * (k - 1) + [1.7] + [W] * (T - k))
    out = sample(denoiser, scheduler, rule, noise, labels)
    static = Policy.static(["cfg"] * (k - 1) + [{"op": "cfg", "scale": 1.7}] + ["cond"] * (T - k), W)
    expected = sample(denoiser, scheduler, static, noise, labels)
    assert torch.allclose(out.samples, expected.samples, rtol=1e-5, atol=1e-5) and torch.equal(out.nfe, expected.nfe)
    # A stop scale of 1 is cond at the stopping step (the uncond pass ran there but is not used).
    cond_at_stop = Policy.adaptive(T, W, [1.0] * (k - 1) + [-1.0] * (T - k + 1), stop_scales=[1.0] * T)
    out = sample(denoiser, scheduler, cond_at_stop, noise, labels)
    expected = sample(denoiser, scheduler, Policy.static(["cfg"] * (k - 1) + ["cond"] * (T - k + 1), W), noise, labels)
    assert torch.allclose(out.samples, expected.samples, rtol=1e-5, atol=1e-5)


def test_resume_continues_a_paused_trajectory(denoiser, scheduler):
    import copy

    noise, labels = noise_and_labels()
    policy = Policy.static(["cfg", "cfg", "cond", "cfg", "cond", "cond"], W)
    paused = {}

    def pause(stats):
        paused[stats.i] = Resume(stats.i, stats.x, copy.deepcopy(stats.scheduler))

    full = sample(denoiser, scheduler, policy, noise, labels, callback=pause)
    for i in (1, 3, 5):
        rest = sample(denoiser, scheduler, policy, noise, labels, resume=paused[i])
        assert torch.allclose(rest.samples, full.samples, atol=1e-6), i
        assert bool((rest.nfe == sum(2 if op == "cfg" else 1 for op in ["cfg", "cfg", "cond", "cfg", "cond", "cond"][i:])).all())


# -- tables, relaxation, calibration ------------------------------------------------------------------
@pytest.fixture
def tables(denoiser, scheduler):
    noise, labels = noise_and_labels(12)
    return noise, labels, tabulate(denoiser, scheduler, noise, labels, T, W)


def test_tables_match_sampling_every_cutoff(denoiser, scheduler, tables):
    noise, labels, table = tables
    teacher = sample(denoiser, scheduler, Policy.static(["cfg"] * T, W), noise, labels)
    assert torch.allclose(table.gamma, teacher.cosine_x0.T.double())
    for k in range(1, T + 1):
        out = sample(denoiser, scheduler, Policy.static(["cfg"] * k + ["cond"] * (T - k), W), noise, labels)
        mse = (out.samples - teacher.samples).pow(2).flatten(1).mean(1).double()
        assert torch.allclose(table.distance[:, k - 1], mse, rtol=1e-4, atol=1e-9), k


def test_hard_outcome_is_what_the_sampler_does(denoiser, scheduler, tables):
    """The tables predict the rule exactly: per-sample NFE and distance of a per-step threshold
    policy run by the sampler, from the same noise."""
    noise, labels, table = tables
    teacher = sample(denoiser, scheduler, Policy.static(["cfg"] * T, W), noise, labels)
    levels = torch.tensor([0.3, 0.5, 0.7, 0.4, 0.6, 0.5], dtype=torch.float64)
    q = torch.nanquantile(table.gamma, levels, dim=0).diagonal()  # θ_t somewhere inside each step's γ spread
    thresholds = [min(float(v), 0.999999) for v in q]  # (θ = 1 would mean "never stop")
    out = sample(denoiser, scheduler, Policy.adaptive(T, W, thresholds), noise, labels)
    k = guided_steps(table.gamma, to_u(torch.tensor(thresholds, dtype=torch.float64)))
    assert 1 < len(set(k.tolist()))  # samples differ
    assert torch.equal(out.nfe.long(), T + k)
    mse = (out.samples - teacher.samples).pow(2).flatten(1).mean(1).double()
    assert torch.allclose(mse, table.distance.gather(1, (k - 1)[:, None]).squeeze(1), rtol=1e-4, atol=1e-9)


def test_stop_scale_tables_predict_the_sampler(denoiser, scheduler):
    """With stop scales the tables hold the quadratic of the stopping step's scale; at the probe
    scale it is exact: the hard rule's predicted per-sample distance is the sampler's."""
    noise, labels = noise_and_labels(12)
    table = tabulate(denoiser, scheduler, noise, labels, T, W, stop_scales=True)
    plain = tabulate(denoiser, scheduler, noise, labels, T, W)
    assert torch.equal(table.distance, plain.distance) and table.has_stop_scales and not plain.has_stop_scales
    assert bool((table.cross[:, -1] == 0).all()) and bool((table.curvature >= 0).all()) and bool((table.curvature[:, 0] > 0).all())
    teacher = sample(denoiser, scheduler, Policy.static(["cfg"] * T, W), noise, labels)
    thresholds = [min(float(v), 0.999999) for v in torch.nanquantile(table.gamma, 0.5, dim=0)]
    shift = torch.full((T,), STOP_PROBE, dtype=torch.float64)
    out = sample(denoiser, scheduler, Policy.adaptive(T, W, thresholds, stop_scales=[W + STOP_PROBE] * T), noise, labels)
    k = guided_steps(table.gamma, to_u(torch.tensor(thresholds, dtype=torch.float64)))
    assert 1 < len(set(k.tolist())) and torch.equal(out.nfe.long(), T + k)
    mse = (out.samples - teacher.samples).pow(2).flatten(1).mean(1).double()
    predicted = table.distances(shift).gather(1, (k - 1)[:, None]).squeeze(1)
    assert torch.allclose(mse, predicted, rtol=1e-3, atol=1e-9)
    nfe, d = hard_outcome(table, to_u(torch.tensor(thresholds, dtype=torch.float64)), shift)
    assert float(d) == pytest.approx(float(mse.mean()), rel=1e-3)
    with pytest.raises(ValueError, match="stop scales are searched on the MSE"):
        tabulate(denoiser, scheduler, noise, labels, T, W, distance="l1", stop_scales=True)


def test_relaxation_is_a_distribution_and_tends_to_the_hard_rule(tables):
    _, _, table = tables
    u = torch.nanquantile(to_u(table.gamma), 0.5, dim=0)
    P, guided = stop_distribution(table.gamma, u, 0.3)
    assert torch.allclose(P.sum(1), torch.ones(len(P), dtype=P.dtype)) and bool((guided[:, 0] == 1).all())
    assert bool((guided[:, 1:] <= guided[:, :-1] + 1e-12).all())  # sticky: the share never grows
    hard_nfe, hard_d = hard_outcome(table, u - 1e-3)  # off the ties
    soft_nfe, soft_d, _ = soft_outcome(table, u - 1e-3, 1e-6)
    assert torch.allclose(soft_nfe, hard_nfe) and torch.allclose(soft_d, hard_d)
    u_grad = u.clone().requires_grad_(True)
    soft_outcome(table, u_grad, 0.5)[0].backward()
    assert bool((u_grad.grad[: T - 1] > 0).all()) and u_grad.grad[T - 1] == 0  # higher θ: more NFE; last θ unused


def test_calibration_meets_the_budget(tables):
    _, _, table = tables
    u = torch.linspace(1.0, 4.0, T, dtype=torch.float64)
    reachable = [float(hard_outcome(table, u + d)[0]) for d in torch.linspace(-30, 30, 6001, dtype=torch.float64)]
    for budget in (T + 2, T + 3, 2 * T - 1):
        offset = calibrate(table.gamma, u, budget)
        nfe, _ = hard_outcome(table, u + offset)
        assert abs(float(nfe) - budget) <= min(abs(r - budget) for r in reachable) + 1e-9, (budget, float(nfe))
    assert float(from_u(to_u(0.97))) == pytest.approx(0.97) and float(from_u(-5.0)) == -1.0


# -- the space and the search -------------------------------------------------------------------------
def test_adaptive_space_loads_and_refuses_ops_it_cannot_gate(tmp_path):
    space = SearchSpace.load("adaptive_cosine")
    assert space.kind == "adaptive" and space.rule == {"rule": "ag_cosine", "space": "x0", "stop_scales": True}
    assert SearchSpace.load("adaptive_thresholds").rule["stop_scales"] is False
    assert SearchSpace.load(space.to_dict()) == SearchSpace.load(space.to_dict())
    path = tmp_path / "r.yaml"
    path.write_text("kind: adaptive\nrule: {rule: ag_cosine, stop_scales: maybe}\nops: [{op: cfg}, {op: cond}]\n")
    with pytest.raises(SpaceError, match="stop_scales: true or false"):
        SearchSpace.load(path)
    for ops, fragment in (("[{op: cfg}, {op: cond}, {op: uncond}]", "gates CFG at the run's scale against cond"),
                          ("[{op: cfg, scales: [1, 2]}, {op: cond}]", "without scales"),
                          ("[{op: cfg}, {op: cond}]\nrelaxation: {kind: gumbel_st}", "expected one of stopping")):
        path = tmp_path / "s.yaml"
        path.write_text(f"kind: adaptive\nops: {ops}\n")
        with pytest.raises(SpaceError, match=fragment):
            SearchSpace.load(path)


ADAPTIVE = ["--model.model=digits", "--model.space=adaptive_cosine", f"--model.num_inference_steps={T}", "--model.budget=9",
            "--model.guidance_scale=1.5", "--data.num_pairs=8", "--data.batch_size=4", "--data.num_val=4",
            "--data.num_calibration=16", "--trainer.max_steps=6", "--progress=false"]


def adaptive_args(tmp_path, *extra, wandb="disabled", eval_samples=0):
    return [*ADAPTIVE, f"--trainer.default_root_dir={tmp_path / 'runs'}", f"--wandb.mode={wandb}",
            f"--eval.samples={eval_samples}", *extra]


def test_adaptive_search_cli_writes_a_calibrated_rule_and_wandb_files(tmp_path):
    out = tmp_path / "policy.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "agsearch.cli", "search", *adaptive_args(tmp_path, f"--out={out}", wandb="offline",
                                                                         eval_samples=16)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "θ_t =" in proc.stdout and "AG γ̄=" in proc.stdout  # the comparison with AG at the same calibration
    policy = Policy.load(out)
    assert policy.kind == "adaptive" and len(policy.rule["thresholds"]) == T and len(policy.rule["stop_scales"]) == T
    assert policy.rule["stop_scales"][-1] == 1.5  # the last step's is never used
    calibration = policy.provenance["search"]["calibration"]
    assert calibration["pairs"] == 16 and abs(calibration["mean_nfe"] - 9) <= 1
    assert {"nfe", "accuracy", "mse", "fd"} <= set(policy.metrics["eval"])
    (run,) = (tmp_path / "runs").iterdir()
    history = json.loads((run / "thresholds.json").read_text())
    assert len(history["epochs"]) == 3 and len(history["epochs"][-1]["thresholds"]) == T
    assert len(history["epochs"][-1]["guided"]) == T and (run / "thresholds.png").is_file()
    assert history["epochs"][-1]["stop_scales"] == policy.rule["stop_scales"]
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    tables = list((wandb_run / "files" / "media" / "table" / "thresholds").glob("*.table.json"))
    images = list((wandb_run / "files" / "media" / "images" / "thresholds").glob("*.png"))
    assert len(tables) == 3 and len(images) == 3
    assert json.loads(tables[0].read_text())["columns"] == ["step", "theta", "guided_share", "stop_scale"]


def test_adaptive_same_seed_same_policy_and_export(tmp_path, capsys):
    policies = []
    for root in (tmp_path / "a", tmp_path / "b"):
        assert run_cli(capsys, "search", *adaptive_args(root))[0] == 0
        (run,) = (root / "runs").iterdir()
        policies.append(Policy.load(run / "policy.json"))
    assert policies[0].rule == policies[1].rule and "stop_scales" in policies[0].rule
    assert run_cli(capsys, "search", *adaptive_args(tmp_path / "c"), "--model.space=adaptive_thresholds")[0] == 0
    (plain,) = (tmp_path / "c" / "runs").iterdir()
    assert "stop_scales" not in Policy.load(plain / "policy.json").rule  # thresholds only: AG's CFG at the stop
    ckpt = run / "checkpoints" / "last.ckpt"
    code, out, err = run_cli(capsys, "export", ckpt, "--budget", 11, "--out", tmp_path / "b11.json")
    assert code == 0, err
    exported = Policy.load(tmp_path / "b11.json")
    assert exported.provenance["search"]["budget"] == 11
    assert abs(exported.provenance["search"]["calibration"]["mean_nfe"] - 11) <= 1
    code, _, err = run_cli(capsys, "export", ckpt, "--budget", 13, "--out", tmp_path / "x.json")
    assert code == 2 and "between 7 and 12" in err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--model.budget=6"], "between 7 and 12"),
    (["--model.straight_through=sampled"], "does not apply to the adaptive space"),
    (["--model.polish_rounds=2"], "does not apply to the adaptive space"),
    (["--model.temperature_end=-0.1"], "positive number"),
    (["--model.distance=l1"], "needs model.distance=mse"),
])
def test_adaptive_search_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, fragment):
    code, out, err = run_cli(capsys, "search", *adaptive_args(tmp_path), *extra)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and fragment in err


def test_searches_in_one_process_tabulate_each_pair_once(tmp_path, monkeypatch):
    """A sweep's adaptive searches at several budgets share the tables of their pairs (and the
    calibration γ): the second search tabulates nothing and finds the rule a fresh process finds."""
    import agsearch.search.thresholds as thresholds
    from agsearch.cli.search import run_search

    calls, real = [], thresholds.tabulate
    monkeypatch.setattr(thresholds, "tabulate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    monkeypatch.setattr(thresholds, "_SHARED_TABLES", {})
    monkeypatch.setattr(thresholds, "_SHARED_CALIBRATION", {})
    run_search(adaptive_args(tmp_path / "a"))
    tabulated = sum(calls)
    second, _, _ = run_search(adaptive_args(tmp_path / "b", "--model.budget=10"))
    assert tabulated == 12 and sum(calls) == tabulated  # 8 training and 4 validation pairs, once
    monkeypatch.setattr(thresholds, "_SHARED_TABLES", {})
    monkeypatch.setattr(thresholds, "_SHARED_CALIBRATION", {})
    fresh, _, _ = run_search(adaptive_args(tmp_path / "c", "--model.budget=10"))
    assert second.rule == fresh.rule and second.nfe == fresh.nfe
