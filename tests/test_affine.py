"""LinearAG: the affine op in the policy file and the sampling loop (hard and soft weights, NFE
counting, fallbacks), the ridge fit, `agsearch fit-affine` / `baseline linear-ag`, bad input, and
the affine op in a search space."""

import json
import math

import pytest
import torch

from agsearch.cli import main
from agsearch.diffusers.schedulers import make_scheduler
from agsearch.guidance.sampler import sample
from agsearch.linear_ag import REGRESSORS, AffineError, affine_step, load_builtin
from agsearch.linear_ag_fit import fit
from agsearch.models.digits import SCHEDULER_CONFIG
from agsearch.policy import Policy, PolicyError
from agsearch.search.gates import GateController

W = 1.5


def coef(**values):
    return {name: values.get(name, 0.0) for name in REGRESSORS}


PAST = coef(eps_c=0.5, eps_u_prev=0.5)  # uses the previous step's estimates
NOW = coef(eps_c=1.0)  # ε̂_u = ε_c: affine CFG is then exactly `cond`


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- the policy file ----------------------------------------------------------------------------------
def test_affine_costs_one_nfe_and_fallback_is_validated():
    p = Policy.static(["cfg", affine_step(PAST, None), affine_step(PAST, None), "cond"], W)
    assert p.nfe == 5 and p.ops_string() == "CAAc"
    assert Policy.loads(p.dumps()).steps == p.steps
    # Step 0 has no past: without a fallback the policy is refused, with one it costs the fallback.
    with pytest.raises(PolicyError, match="first step.*fallback") as info:
        Policy.static([affine_step(PAST, None), "cond"], W)
    assert info.value.pointer == "/steps/0"
    with pytest.raises(PolicyError, match=r"step 0 \(cond\) does not provide") as info:
        Policy.static(["cond", affine_step(PAST, None)], W)
    assert info.value.pointer == "/steps/1"
    assert Policy.static([affine_step(PAST, "cfg"), affine_step(PAST, None)], W).nfe == 3
    # cond fallback provides no ε_u, so the next affine step is missing it again
    with pytest.raises(PolicyError, match="/steps/1"):
        Policy.static([affine_step(PAST, "cond"), affine_step(PAST, None)], W)
    # a map without past coefficients needs no fallback anywhere
    assert Policy.static([affine_step(NOW, None), "cond"], W).nfe == 2


@pytest.mark.parametrize("step, fragment", [
    ({"op": "affine", "coef": {k: 0.0 for k in REGRESSORS[:-1]}}, "'bias' is a required property"),
    ({"op": "affine", "coef": {**NOW, "x2": 1.0}}, "Additional properties"),
    ({"op": "affine", "coef": {**NOW, "x": [1.0, 2.0]}}, "mixes per-channel lists and scalars"),
    ({"op": "affine", "coef": {**{k: [0.0] for k in REGRESSORS}, "x": [1.0, 2.0]}}, "per-channel values"),
    ({"op": "affine", "coef": {**NOW, "x": float("nan")}}, "not a finite number"),
    ({"op": "affine", "coef": {**NOW, "x": "1"}}, "is not valid"),
    ({"op": "affine"}, "'coef' is a required property"),
    ({"op": "cond", "coef": NOW}, "'coef' is only allowed on 'affine' steps"),
    ({"op": "cfg", "fallback": "cond"}, "'fallback' is only allowed on 'affine' steps"),
    ({"op": "affine", "coef": PAST, "fallback": "uncond"}, "one of"),
])
def test_bad_affine_steps(step, fragment):
    with pytest.raises(PolicyError) as info:
        Policy.from_dict({"format": "agsearch.policy", "version": 1, "kind": "static", "num_inference_steps": 2,
                          "guidance_scale": W, "steps": [{"op": "cfg"}, step]})
    assert fragment in str(info.value) and "/steps/1" in str(info.value) and "\n" not in str(info.value)


# -- the sampling loop --------------------------------------------------------------------------------
def _noise(b=4, seed=0):
    return torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.arange(b) % 10


def test_affine_with_identity_map_is_cond_and_costs_one_pass(denoiser):
    sched = make_scheduler("ddim", SCHEDULER_CONFIG)
    noise, labels = _noise()
    cond = sample(denoiser, sched, Policy.static(["cond"] * 5, W), noise, labels)
    denoiser.evaluations = 0
    aff = sample(denoiser, sched, Policy.static([affine_step(NOW, None)] * 5, W), noise, labels)
    assert torch.allclose(aff.samples, cond.samples, atol=1e-6)
    assert aff.nfe.tolist() == [5.0] * 4 and denoiser.evaluations == 20


def test_affine_uses_the_previous_estimates(denoiser):
    """ε̂_u = ε_u(t−1) after a CFG step: the affine step's output is ε_u(t−1) + w (ε_c(t) − ε_u(t−1))."""
    sched = make_scheduler("ddim", SCHEDULER_CONFIG)
    noise, labels = _noise()
    seen = []
    policy = Policy.static(["cfg", affine_step(coef(eps_u_prev=1.0), None), affine_step(coef(eps_u_prev=1.0), "cfg")], W)
    out = sample(denoiser, sched, policy, noise, labels, callback=lambda s: seen.append(s))
    assert out.nfe.tolist() == [4.0] * 4  # 2 + 1 + 1: the chain keeps ε̂_u available
    assert not seen[1].ran_uncond.any() and not seen[2].ran_uncond.any()
    # Replay by hand with the same denoiser outputs.
    import copy

    s2 = copy.deepcopy(sched)
    s2.set_timesteps(3)
    x = noise.clone()
    u_prev = None
    for i, t in enumerate(s2.timesteps):
        c, u = seen[i].out_c, seen[i].out_u
        u_used = u if i == 0 else u_prev
        x = s2.step(u_used + W * (c - u_used), t, x).prev_sample
        u_prev = u_used
    assert torch.allclose(x, out.samples, atol=1e-5)


def test_fallback_cfg_runs_the_unconditional_pass_only_where_needed(denoiser):
    sched = make_scheduler("ddim", SCHEDULER_CONFIG)
    noise, labels = _noise()
    policy = Policy.static([affine_step(PAST, "cfg"), "cond", affine_step(PAST, "cfg"), affine_step(PAST, None)], W)
    denoiser.evaluations = 0
    out = sample(denoiser, sched, policy, noise, labels)
    assert policy.nfe == 6 and out.nfe.tolist() == [6.0] * 4 and denoiser.evaluations == 24


def test_missing_past_without_fallback_is_an_error_at_run_time(denoiser):
    ops = [{"op": "affine", "coef": PAST}]
    ctrl = GateController(ops, torch.ones(2, 3, 1), W, compute_all=False)
    noise, labels = _noise(2)
    with pytest.raises(ValueError, match="step 0: an affine op needs the previous step's estimates.*no fallback"):
        sample(denoiser, make_scheduler("ddim", SCHEDULER_CONFIG), None, noise, labels, controller=ctrl)


def test_per_channel_coefficients_must_match_the_channels(denoiser):
    bad = {k: [0.0, 0.0] for k in REGRESSORS}
    bad["eps_c"] = [1.0, 1.0]
    noise, labels = _noise(2)
    with pytest.raises(AffineError, match="2 per-channel values, but the model's output has 1 channels"):
        sample(denoiser, make_scheduler("ddim", SCHEDULER_CONFIG), Policy.static([affine_step(bad, None)] * 2, W), noise, labels)
    good = {k: [v] for k, v in NOW.items()}
    out = sample(denoiser, make_scheduler("ddim", SCHEDULER_CONFIG), Policy.static([affine_step(good, None)] * 2, W), noise, labels)
    assert torch.isfinite(out.samples).all()


def test_soft_gates_and_coefficients_get_gradients(denoiser):
    """The search's mixed op: soft weights over cfg / cond / affine, coefficients as a tensor."""
    from agsearch.search.gates import affine_coef_at

    T, B = 4, 3
    logits = torch.zeros(T, 3, requires_grad=True)
    coefs = torch.tensor([[1.0, 0.2, 0.3, 0.0, 0.0]] * T, requires_grad=True)
    ops = [{"op": "cfg"}, {"op": "cond"}, {"op": "affine", "fallback": "cond"}]

    class Ctrl(GateController):
        def plan(self, i, batch, device):
            plan = super().plan(i, batch, device)
            assert plan.ops[2]["coef"]["eps_c"] is not None
            return plan

    ctrl = Ctrl(ops, logits.softmax(dim=1).expand(B, -1, -1), W, compute_all=False, affine_coef=coefs)
    assert float(affine_coef_at(coefs, 0)["eps_u_prev"]) == 0.0  # step 0 has no past
    noise, labels = _noise(B)
    out = sample(denoiser, make_scheduler("ddim", SCHEDULER_CONFIG), None, noise, labels, controller=ctrl)
    out.samples.pow(2).mean().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, 2].abs().sum() > 0
    assert torch.isfinite(coefs.grad).all() and coefs.grad[1:, 2].abs().sum() > 0  # ε_u(t−1) matters from step 1 on


# -- fitting ------------------------------------------------------------------------------------------
def test_ridge_fit_recovers_an_exact_affine_map():
    g = torch.Generator().manual_seed(0)
    T, B = 3, 40
    x = torch.randn(T, B, 1, 8, 8, generator=g)
    eps_c = torch.randn(T, B, 1, 8, 8, generator=g)
    eps_u = torch.empty_like(eps_c)
    eps_u[0] = 0.9 * eps_c[0] + 0.1 * x[0] + 0.05
    for t in range(1, T):
        eps_u[t] = 0.7 * eps_c[t] + 0.2 * eps_c[t - 1] + 0.1 * eps_u[t - 1] - 0.3 * x[t] + 0.01
    zero = torch.zeros_like(eps_c[:1])
    data = {"x": x, "eps_c": eps_c, "eps_u": eps_u, "eps_c_prev": torch.cat([zero, eps_c[:-1]]),
            "eps_u_prev": torch.cat([zero, eps_u[:-1]])}
    result = fit(data, data, ridge=0.0)
    c1 = result["coefficients"][1]
    assert c1 == pytest.approx(dict(eps_c=0.7, eps_c_prev=0.2, eps_u_prev=0.1, x=-0.3, bias=0.01), abs=1e-5)
    assert result["coefficients"][0]["eps_u_prev"] == 0.0 and result["coefficients"][0]["x"] == pytest.approx(0.1, abs=1e-5)
    assert min(result["r2"]["delta"]) > 0.999999 and max(result["r2"]["delta_cond"]) < 0.01
    per_channel = fit(data, data, ridge=0.0, per_channel=True)["coefficients"][2]
    assert per_channel["x"] == [pytest.approx(-0.3, abs=1e-5)]


def test_shipped_coefficients_match_the_benchmark_settings():
    from agsearch.models.digits import benchmark_settings

    doc = load_builtin()
    s = benchmark_settings()
    assert doc["num_inference_steps"] == s["num_inference_steps"] and doc["guidance_scale"] == s["guidance_scale"]
    assert doc["pairs"]["fit"]["seed"] != 1 and doc["pairs"]["heldout"]["seed"] != 1  # evaluation seeds held out
    assert all(math.isfinite(r) for r in doc["r2"]["delta"])


# -- the command line ---------------------------------------------------------------------------------
def test_fit_affine_cli_writes_coefficients_policy_and_report(tmp_path, capsys):
    out, pol, rep = tmp_path / "c.json", tmp_path / "p.json", tmp_path / "r2.md"
    code, stdout, err = run_cli(capsys, "fit-affine", "--pairs", 4, "--heldout", 2, "--out", out, "--policy", pol, "--report", rep)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert len(doc["coefficients"]) == doc["num_inference_steps"] and "R² of δ" in stdout
    p = Policy.load(pol)
    assert p.ops_string().startswith("CACA") and p.nfe == 32  # T = 25: 7 cfg + 6 affine + 12 cond
    assert "| 24 |" in rep.read_text()
    code, _, err = run_cli(capsys, "fit-affine", "--pairs", 4, "--seed", 1, "--out", out)
    assert code == 2 and "held-out evaluation seed" in err and err.count("\n") == 1


def test_baseline_linear_ag_with_shipped_and_given_coefficients(tmp_path, capsys):
    code, out, err = run_cli(capsys, "baseline", "linear-ag", "--out", tmp_path / "la.json")
    assert code == 0, err and "NFE 32 of 50" in out
    code, out, err = run_cli(capsys, "baseline", "affine-cutoff", "--fraction", 0.2, "--out", tmp_path / "ac.json")
    assert code == 0 and Policy.load(tmp_path / "ac.json").ops_string() == "C" * 5 + "A" * 20
    doc = load_builtin()
    cases = {
        "count": {**doc, "coefficients": doc["coefficients"][:-1]},
        "shape": {**doc, "coefficients": [{**c, "x": [1.0, 2.0]} for c in doc["coefficients"]]},
        "missing": {**doc, "coefficients": [{k: v for k, v in c.items() if k != "bias"} for c in doc["coefficients"]]},
    }
    for name, bad in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bad))
        code, _, err = run_cli(capsys, "baseline", "linear-ag", "--affine", path, "--out", tmp_path / "x.json")
        assert code == 2 and err.count("\n") == 1 and str(path) in err, (name, err)
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(doc).replace(str(doc["coefficients"][3]["x"]), "NaN", 1))
    code, _, err = run_cli(capsys, "baseline", "linear-ag", "--affine", path, "--out", tmp_path / "x.json")
    assert code == 2 and "NaN is not allowed" in err
    code, _, err = run_cli(capsys, "baseline", "linear-ag", "--steps", 10, "--out", tmp_path / "x.json")
    assert code == 2 and "fitted for 25 steps" in err
    assert not (tmp_path / "x.json").exists()


def test_eval_refuses_affine_policy_without_fallback(tmp_path, capsys):
    doc = Policy.static(["cfg"] * 25, 1.1).to_dict()
    doc["steps"][3] = {"op": "cond"}
    doc["steps"][4] = {"op": "affine", "coef": PAST}
    doc["nfe"] = 48
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    code, _, err = run_cli(capsys, "eval", "--policy", path, "--samples", 10)
    assert code == 2 and "/steps/4" in err and "fallback" in err and err.count("\n") == 1


# -- the search ---------------------------------------------------------------------------------------
def test_affine_search_space_fixed_and_trained(tmp_path, capsys):
    """A tiny search (T = 5) over cfg / cond / affine with coefficients fitted for T = 5: the fixed
    coefficients stay put, the trained ones move, and both export valid policies."""
    from agsearch.linear_ag_fit import fit_digits
    from agsearch.search.space import SearchSpace

    doc = fit_digits(pairs=4, heldout=2, num_inference_steps=5)
    (tmp_path / "c.json").write_text(json.dumps(doc))
    runs = {}
    for train in (False, True):
        space = tmp_path / f"space_{train}.yaml"
        space.write_text(f"ops: [{{op: cfg}}, {{op: cond}}, {{op: affine, coefficients: {tmp_path / 'c.json'}, train: {str(train).lower()}}}]\n")
        assert SearchSpace.load(space).candidates(1.1)[2] == {"op": "affine", "fallback": "cond"}
        out = tmp_path / f"policy_{train}.json"
        code = main(["search", "--model.model=digits", f"--model.space={space}", "--model.num_inference_steps=5", "--model.budget=7",
                     "--data.num_pairs=8", "--data.batch_size=4", "--data.num_val=4", "--trainer.max_steps=3",
                     "--progress=false", f"--trainer.default_root_dir={tmp_path / 'runs'}", "--wandb.mode=disabled",
                     "--eval.samples=0", "--model.affine_lr=0.05", f"--out={out}"])
        assert code == 0, capsys.readouterr().err
        policy = Policy.load(out)
        assert policy.nfe == 7
        runs[train] = {i: s["coef"] for i, s in enumerate(policy.steps) if s["op"] == "affine"}
    for i, c in runs[False].items():  # fixed: the fit's coefficients, exported as they are
        assert c == pytest.approx(doc["coefficients"][i], abs=1e-6)
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops: [{op: cfg}, {op: affine, train: maybe}]\n")
    code, _, err = run_cli(capsys, "search", f"--model.space={bad}", "--progress=false")
    assert code == 2 and "'train' must be true or false" in err


# -- the benchmark ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_merges_affine_rows_into_an_existing_table(tmp_path, capsys):
    from agsearch.eval.bench import run_benchmark

    first = run_benchmark(tmp_path, samples=10, progress=False, quick=True)
    assert {"linear-ag", "affine-cutoff"} <= {r["family"] for r in first}
    Policy.static(["cfg"] * 5 + ["cond"] * 20, 1.1, name="my-policy").save(tmp_path / "p.json")
    code, _, err = run_cli(capsys, "bench", "--out-dir", tmp_path, "--samples", 10, "--quick", "--no-progress",
                           "--families", "affine-cutoff", "--policy", tmp_path / "p.json", "--merge")
    assert code == 0, err
    data = json.loads((tmp_path / "benchmark.json").read_text())
    families = [r["family"] for r in data["records"]]
    assert len(data["records"]) == len(first) + 1 and families.count("affine-cutoff") == 1
    assert len(data["commands"]) == 2 and "## policy file" in (tmp_path / "benchmark.md").read_text()
    code, _, err = run_cli(capsys, "bench", "--out-dir", tmp_path, "--samples", 20, "--quick", "--families", "cutoff", "--merge")
    assert code == 2 and "--merge" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "bench", "--out-dir", tmp_path, "--samples", 10, "--quick", "--families", "nope")
    assert code == 2 and "unknown benchmark family 'nope'" in err


def test_bench_merges_eval_records(tmp_path, capsys):
    from agsearch.eval.bench import run_benchmark

    run_benchmark(tmp_path, samples=10, progress=False, quick=True, families=["cfg", "cond"])
    code, _, err = run_cli(capsys, "baseline", "affine-cutoff", "--fraction", 0.2, "--out", tmp_path / "ac.json")
    code, _, err = run_cli(capsys, "eval", "--policy", tmp_path / "ac.json", "--samples", 10, "--no-progress",
                           "--json", tmp_path / "eval.json")
    assert code == 0, err
    code, _, err = run_cli(capsys, "bench", "--out-dir", tmp_path, "--samples", 10, "--quick", "--no-progress",
                           "--families", "cfg", "--records", tmp_path / "eval.json", "--merge")
    assert code == 0, err
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["family"] for r in data["records"]] == ["cond", "cfg", "affine-cutoff"]
    code, _, err = run_cli(capsys, "bench", "--out-dir", tmp_path, "--samples", 20, "--quick", "--families", "cfg",
                           "--records", tmp_path / "eval.json")
    assert code == 2 and "needs --merge" in err


def test_linear_ag_from_a_policy_makes_its_cond_steps_affine(tmp_path, capsys):
    base = Policy.static(["cfg", "cond", {"op": "cfg", "scale": 1.3}] + ["cond"] * 22, 1.1)
    base.save(tmp_path / "base.json")
    code, out, err = run_cli(capsys, "baseline", "linear-ag", "--from", tmp_path / "base.json", "--out", tmp_path / "p.json")
    assert code == 0, err
    p = Policy.load(tmp_path / "p.json")
    assert p.ops_string() == "CAC" + "A" * 22 and p.nfe == base.nfe and p.steps[2] == {"op": "cfg", "scale": 1.3}
    code, _, err = run_cli(capsys, "baseline", "cutoff", "--fraction", 0.2, "--from", tmp_path / "base.json", "--out", tmp_path / "q.json")
    assert code == 2 and "--from is an option of linear-ag" in err


def test_the_shipped_coefficients_load_and_make_the_linear_ag_baseline(tmp_path):
    from agsearch.linear_ag import FORMAT, load_builtin

    document = load_builtin()
    assert document["format"] == FORMAT == "agsearch.affine"  # the file format's name is a contract
    assert main(["baseline", "linear-ag", "--out", str(tmp_path / "la.json")]) == 0
    assert Policy.load(tmp_path / "la.json").nfe == 32
