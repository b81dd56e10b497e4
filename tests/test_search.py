"""The search: spaces, discretisation, the LightningModule, `agsearch search`/`export`/`sweep`,
W&B offline files, resume, determinism, bad input and NaN handling. Runs use the built-in digits
model on tiny settings (T = 5 steps, a few pairs) so they take seconds on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agsearch.cli import main
from agsearch.policy import Policy
from agsearch.search.discretize import discretize
from agsearch.search.space import SearchSpace, SpaceError, builtin_spaces

TINY = ["--model.model=digits", "--model.space=minimal", "--model.num_inference_steps=5", "--model.budget=7", "--data.num_pairs=8", "--data.batch_size=4",
        "--data.num_val=4", "--trainer.max_steps=4", "--progress=false"]


def tiny(tmp_path, *extra, wandb="disabled", eval_samples=0):
    return [*TINY, f"--trainer.default_root_dir={tmp_path / 'runs'}", f"--wandb.mode={wandb}",
            f"--eval.samples={eval_samples}", *extra]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def only_run_dir(tmp_path) -> Path:
    (run,) = (tmp_path / "runs").iterdir()
    return run


# -- spaces -----------------------------------------------------------------------------------------
def test_builtin_spaces_resolve():
    assert {"minimal", "adaptive_guidance", "cfg_scales"} <= set(builtin_spaces())
    minimal = SearchSpace.load("minimal")
    assert minimal.candidates(1.5) == [{"op": "cfg"}, {"op": "cond"}]
    ag = SearchSpace.load("adaptive_guidance")
    cands = ag.candidates(3.0)  # strengths m -> 1 + m (w - 1)
    assert {"op": "cfg", "scale": 2.0} in cands and {"op": "cfg"} in cands and {"op": "uncond"} in cands
    assert SearchSpace.costs(cands) == [2] * (len(cands) - 2) + [1, 1]


@pytest.mark.parametrize("text, fragment", [
    ("ops: [{op: affine_typo}, {op: cond}]", "unknown op 'affine_typo'"),
    ("ops: [{op: cfg, nfe: 1}, {op: cond}]", "costs 2 NFE"),
    ("ops: [{op: cfg}, {op: cond}]\nrelaxation: {temperature: {start: -1}}", "positive number"),
    ("ops: [{op: cfg}, {op: cond}]\nrelaxation: {kind: hard}", "relaxation.kind"),
    ("ops: [{op: cfg}]", "at least two"),
    ("ops: [{op: cfg, scales: [.nan]}, {op: cond}]", "finite numbers"),
    ("ops: [{op: cfg}, {op: cond}\n", "invalid YAML"),
    ("opz: []", "unknown key 'opz'"),
])
def test_bad_space_files(tmp_path, text, fragment):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=None) as info:
        SearchSpace.load(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_unknown_space_name():
    with pytest.raises(SpaceError, match="unknown search space 'nope'.*minimal"):
        SearchSpace.load("nope")


# -- discretisation ---------------------------------------------------------------------------------
def test_exact_discretisation_meets_budget_and_keeps_top_cfg_steps():
    torch.manual_seed(0)
    p_cfg = torch.rand(25)
    probs = torch.stack([p_cfg, 1 - p_cfg], dim=1)
    for budget in (25, 30, 37, 50):
        picks = discretize(probs, [2, 1], budget, "exact")
        assert sum([2, 1][k] for k in picks) == budget
        chosen = {t for t, k in enumerate(picks) if k == 0}
        assert chosen == set(p_cfg.argsort(descending=True)[: budget - 25].tolist())


def test_exact_discretisation_with_many_ops_is_optimal():
    torch.manual_seed(1)
    probs = torch.rand(6, 4).softmax(1)
    costs = [2, 2, 1, 1]
    picks = discretize(probs, costs, 9, "exact")
    best = max(
        (sum(probs[t, k].log().item() for t, k in enumerate(ks)), ks)
        for ks in __import__("itertools").product(range(4), repeat=6) if sum(costs[k] for k in ks) == 9
    )
    assert tuple(picks) == best[1]


def test_argmax_and_bad_budgets():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert discretize(probs, [2, 1], None, "argmax") == [0, 1]
    for budget in (1, 5, 2.5, None):
        with pytest.raises(ValueError, match="between 2 and 4"):
            discretize(probs, [2, 1], budget, "exact")


# -- the module -------------------------------------------------------------------------------------
def test_module_trains_only_gates_and_keeps_the_model_out_of_checkpoints():
    from agsearch.search.gates import PolicySearchModule

    module = PolicySearchModule(model="digits", space="adaptive_guidance", budget=35)
    assert [n for n, p in module.named_parameters()] == ["gate_logits"]
    assert module.gate_logits.shape == (25, len(module.candidates))
    assert set(module.state_dict()) == {"gate_logits", "dual", "loss_scale"}
    assert not any(p.requires_grad for p in module.backend.unet.parameters())
    assert abs(module.expected_nfe().item() - 35) < 1e-3  # init: E[NFE] = budget


def test_gradients_reach_every_gate():
    from agsearch.search.data import PairDataset
    from agsearch.search.gates import PolicySearchModule

    module = PolicySearchModule(model="digits", num_inference_steps=5, budget=7)
    ds = PairDataset(0, 4)
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("seed", "label")}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(module.gate_logits.grad).all() and (module.gate_logits.grad != 0).all()


# -- agsearch search --------------------------------------------------------------------------------
def test_search_cli_writes_policy_gates_and_wandb_offline_files(tmp_path):
    out = tmp_path / "policy.json"
    env = {**os.environ, "WANDB_MODE": "", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE")
    proc = subprocess.run(
        [sys.executable, "-m", "agsearch.cli", "search", *tiny(tmp_path, f"--out={out}", wandb="offline", eval_samples=20)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"policy: {out}" in proc.stdout and "cutoff-2/5" in proc.stdout  # the comparison table
    policy = Policy.load(out)
    assert policy.nfe == 7 and policy.num_inference_steps == 5
    search = policy.provenance["search"]
    assert {"space", "budget", "seed", "seconds", "train_steps"} <= set(search) and search["budget"] == 7
    assert policy.provenance["scheduler"] == "DDIMScheduler"
    assert {"nfe", "accuracy", "mse", "fd"} <= set(policy.metrics["eval"])
    run = only_run_dir(tmp_path)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    history = json.loads((run / "gates.json").read_text())
    assert history["ops"] == ["cfg", "cond"] and len(history["epochs"]) == 2  # 8 pairs / 4 per step = 2 steps/epoch
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    tables = list((wandb_run / "files" / "media" / "table" / "gates").glob("*.table.json"))
    images = list((wandb_run / "files" / "media" / "images" / "gates").glob("*.png"))
    assert len(tables) == 2 and len(images) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["step", "cfg", "cond"] and len(table["data"]) == 5
    assert b"policy-" in next(wandb_run.glob("*.wandb")).read_bytes()  # the policy artifact


def gates_at(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]["gate_logits"], ckpt["global_step"]


def test_same_seed_same_policy(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        assert run_cli(capsys, "search", *tiny(root))[0] == 0
    (ga, sa), (gb, _) = gates_at(only_run_dir(a)), gates_at(only_run_dir(b))
    assert sa == 4 and torch.equal(ga, gb)
    pa = Policy.load(only_run_dir(a) / "policy.json")
    assert pa.steps == Policy.load(only_run_dir(b) / "policy.json").steps


def test_export_cli(tmp_path, capsys):
    assert run_cli(capsys, "search", *tiny(tmp_path))[0] == 0
    ckpt = only_run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    for budget, mode in ((9, "exact"), (5, "exact"), (None, "argmax")):
        out = tmp_path / f"p{budget}.json"
        argv = ["export", ckpt, "--out", out, "--mode", mode] + (["--budget", budget] if budget else [])
        code, stdout, err = run_cli(capsys, *argv)
        assert code == 0, err
        policy = Policy.load(out)
        assert policy.provenance["search"]["train_steps"] == 4
        if budget:
            assert policy.nfe == budget
    code, _, err = run_cli(capsys, "export", ckpt, "--budget", 11, "--out", tmp_path / "x.json")
    assert code == 2 and "between 5 and 10" in err and not (tmp_path / "x.json").exists()
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "export", bogus, "--out", tmp_path / "y.json")
    assert code == 2 and err.count("\n") == 1 and "not a readable search checkpoint" in err


@pytest.mark.parametrize("extra, fragment", [
    (["--model.budget=11"], "between 5 and 10"),
    (["--model.budget=4"], "between 5 and 10"),
    (["--model.temperature_start=-1"], "positive number"),
    (["--model.space=nope"], "unknown search space 'nope'"),
    (["--model.nope=1"], "nope"),
    (["--trainer.max_stepz=3"], "max_stepz"),
    (["--model.distance=cosine"], "distance"),
    (["--config=/nonexistent/x.yaml"], "x.yaml"),
])
def test_search_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, fragment):
    code, out, err = run_cli(capsys, "search", *tiny(tmp_path), *extra)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("agsearch search: error:") and "Traceback" not in err
    assert fragment in err


def test_search_bad_space_file(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text("ops: [{op: cfg}, {op: skip}]\n")
    code, _, err = run_cli(capsys, "search", *tiny(tmp_path), f"--model.space={space}")
    assert code == 2 and "unknown op 'skip'" in err and err.count("\n") == 1


def test_nan_loss_stops_the_run_and_it_resumes_from_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from agsearch.search.gates import PolicySearchModule

    real = PolicySearchModule._distance

    def poisoned(self, a, b):
        d = real(self, a, b)
        return d * float("nan") if self.training and self.global_step >= 2 else d

    monkeypatch.setattr(PolicySearchModule, "_distance", poisoned)
    broken = tmp_path / "broken"
    code, out, err = run_cli(capsys, "search", *tiny(broken))
    ckpt = only_run_dir(broken) / "checkpoints" / "last.ckpt"
    last_line = err.strip().splitlines()[-1]
    assert code == 1 and "at step 2" in last_line and "nan" in last_line and str(ckpt) in last_line
    monkeypatch.setattr(PolicySearchModule, "_distance", real)
    # The last good checkpoint (end of epoch 0, step 2) exports ...
    code, _, err = run_cli(capsys, "export", ckpt, "--out", tmp_path / "p.json")
    assert code == 0, err
    assert Policy.load(tmp_path / "p.json").provenance["search"]["train_steps"] == 2
    # ... and resuming it continues the same run directory to the same gates as an unbroken run.
    code, _, err = run_cli(capsys, "search", *tiny(broken, f"--ckpt_path={ckpt}"))
    assert code == 0, err
    resumed, step = gates_at(only_run_dir(broken))
    assert run_cli(capsys, "search", *tiny(tmp_path / "whole"))[0] == 0
    whole, _ = gates_at(only_run_dir(tmp_path / "whole"))
    assert step == 4 and torch.allclose(resumed, whole, atol=1e-6)


def test_print_config_and_config_file(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "search", "--print_config", "--model.budget=33")
    assert code == 0 and "budget: 33" in out and "space: cfg_scales" in out
    config = tmp_path / "c.yaml"
    config.write_text(out.replace("budget: 33", "budget: 8"))
    code, _, err = run_cli(capsys, "search", f"--config={config}", *[a for a in tiny(tmp_path) if not a.startswith("--model.budget")])
    assert code == 0, err
    assert Policy.load(only_run_dir(tmp_path) / "policy.json").nfe == 8


def test_experiment_config_parses(capsys):
    root = Path(__file__).resolve().parents[1]
    code, out, err = run_cli(capsys, "search", f"--config={root / 'experiments' / 'digits.yaml'}", "--print_config")
    assert code == 0 and "space: cfg_scales" in out, err


def test_bf16_autocast_step(tmp_path, capsys):
    code, _, err = run_cli(capsys, "search", *tiny(tmp_path, "--trainer.precision=bf16-mixed", "--trainer.max_steps=2"))
    assert code == 0, err


def test_ddp_two_processes_match_one(tmp_path):
    """2 CPU processes (DDP, gloo), batch 2 each == 1 process, batch 4: same gates and policy."""
    def launch(root, *extra):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "agsearch.cli", "search", *tiny(root), *extra],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = only_run_dir(root)
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return ckpt["state_dict"]["gate_logits"], Policy.load(run / "policy.json")

    one, p1 = launch(tmp_path / "one", "--trainer.accelerator=cpu", "--data.batch_size=4")
    two, p2 = launch(tmp_path / "two", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
                     "--data.batch_size=2")
    assert (one - two).abs().max().item() <= 1e-4
    assert p1.steps == p2.steps and p2.provenance["search"]["processes"] == 2


def test_sweep_writes_table_plot_and_policies(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--budgets", 6, 8, "--samples", 20, "--out-dir", out, "--no-progress",
            "--", "--model.model=digits", "--model.num_inference_steps=5", "--data.num_pairs=8", "--data.batch_size=4",
            "--data.num_val=4", "--trainer.max_steps=2", "--wandb.mode=disabled", f"--trainer.default_root_dir={tmp_path / 'r'}"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    sweep = json.loads((out / "sweep.json").read_text())
    rows = sweep["records"]
    roles = {(r["role"], r["budget"]) for r in rows}
    for b in (6, 8):
        assert {("cutoff", b), ("best interval", b), ("searched (minimal)", b), ("AG (x0) at this NFE", b)} <= roles
    assert (out / "sweep_front.png").stat().st_size > 0 and "| 8 |" in (out / "sweep.md").read_text()
    policy = Policy.load(out / "policies" / "minimal-b8.json")
    assert policy.nfe == 8 and policy.provenance["search"]["wall_seconds"] > 0 and sweep["meta"]["reused"] == []
    # --resume takes the policies of the run above instead of searching again; the table is the same.
    runs = sorted((tmp_path / "r").iterdir())
    code, stdout, err = run_cli(capsys, *args[:1], "--resume", *args[1:])
    assert code == 0, err
    assert stdout.count("reusing ") == 2 and sorted((tmp_path / "r").iterdir()) == runs  # no new search
    again = json.loads((out / "sweep.json").read_text())
    assert again["meta"]["reused"] == ["minimal-b6.json", "minimal-b8.json"]
    assert again["meta"]["search_seconds_total"] == sweep["meta"]["search_seconds_total"]
    assert [r.get("mse") for r in again["records"]] == [r.get("mse") for r in rows]


def test_checkpointing_keeps_saved_memory_flat_in_T(random_unet):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from memory_meter import (
        measure_step,  # experiments/memory_meter.py: measurement code, not the package's
    )

    from agsearch.denoisers.class_conditional import ClassConditionalDenoiser
    from agsearch.diffusers.schedulers import make_scheduler
    from agsearch.models.digits import SCHEDULER_CONFIG
    from agsearch.models.digits.data import NULL_CLASS

    denoiser = ClassConditionalDenoiser(random_unet, NULL_CLASS)
    scheduler = make_scheduler("ddim", SCHEDULER_CONFIG)
    noise, cond = torch.randn(4, 1, 8, 8), torch.arange(4)
    ops = [{"op": "cfg"}, {"op": "cond"}]
    m = {(T, ck): measure_step(denoiser, scheduler, noise, cond, ops, 1.5, T, ck)["saved_mib"]
         for T in (4, 8) for ck in (False, True)}
    assert m[(8, False)] > 1.8 * m[(4, False)]  # grows linearly in T
    assert m[(8, True)] < m[(4, False)] / 10 and m[(8, True)] < m[(8, False)] / 20


def test_other_lightning_loggers_through_the_config(tmp_path, capsys):
    logs = tmp_path / "csv"
    code, _, err = run_cli(capsys, "search", *tiny(tmp_path, "--trainer.logger=CSVLogger",
                                                   f"--trainer.logger.save_dir={logs}"))
    assert code == 0, err
    (metrics,) = logs.rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0]
    assert "train/distance" in header and "val/discrete_distance" in header and "train/expected_nfe" in header
    assert (only_run_dir(tmp_path) / "gates.json").is_file()  # the gate history does not need W&B


def test_checkpointing_defaults_by_device_and_gives_the_same_gradients():
    from agsearch.search.data import PairDataset
    from agsearch.search.gates import PolicySearchModule

    auto = PolicySearchModule(model="digits", space="minimal", num_inference_steps=4, budget=6)
    assert auto.hparams.checkpointing is None and auto.checkpointing is False  # CPU: memory is not the limit
    assert PolicySearchModule(model="digits", space="minimal", num_inference_steps=4, budget=6, checkpointing=True).checkpointing
    batch = PairDataset(3, 4).batch()
    grads = []
    for checkpointing in (False, True):
        auto.gate_logits.grad = None
        weights = auto.gate_weights(batch["seed"])
        auto._student_distance(batch, weights, True, checkpointing)[0].backward()
        grads.append(auto.gate_logits.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)


def test_polish_keeps_the_nfe_and_never_raises_the_distance():
    from agsearch.search.data import PairDataset
    from agsearch.search.gates import PolicySearchModule

    module = PolicySearchModule(model="digits", space="cfg_scales", num_inference_steps=5, budget=7)
    ds = PairDataset(3, 8)
    batch = {k: torch.stack([ds[i][k] for i in range(8)]) for k in ("seed", "label")}
    labels = module.space.labels(module.candidates)
    cond, strong = labels.index("cond"), labels.index("cfg@1.3")
    start = [cond, strong, strong, cond, cond]  # guidance at too high a scale, step 0 unguided
    picks, record = module.polish(batch, start, rounds=2)
    assert sum(module.costs[k] for k in picks) == 7
    assert record["distance_after"] < record["distance_before"] and record["moves"]
    # Moves resume the current trajectory from their first changed step, several in one batch:
    # the distances must be those of full trajectories run alone (up to the rounding of a batch).
    for p, d in ((start, record["distance_before"]), (picks, record["distance_after"])):
        full = module._student_distance(batch, module._hard_weights(p, 8), False, False)[1].item()
        assert full == pytest.approx(d, rel=1e-5)
    assert module.polish(batch, start, rounds=0) == (start, {"rounds": 0, "moves": [], "evaluations": 0})


def test_polish_also_starts_from_the_cutoff():
    """``both`` polishes the gates and the cutoff and keeps the one that ends closer; ``leader``
    (the default) polishes only the one that starts closer."""
    from agsearch.search.data import PairDataset
    from agsearch.search.gates import PolicySearchModule

    module = PolicySearchModule(model="digits", space="minimal", num_inference_steps=5, budget=7, polish_from="both")
    assert module.cutoff_picks() == [0, 0, 1, 1, 1]  # cfg, cfg, cond, cond, cond
    scales_only = {"name": "s", "ops": [{"op": "cfg", "scales": [2.0, 3.0]}, {"op": "cond"}]}
    assert PolicySearchModule(model="digits", space=scales_only, num_inference_steps=5, budget=7).cutoff_picks() is None  # no cfg at w
    batch = PairDataset(3, 8).batch()
    start = [1, 1, 1, 0, 0]  # guidance at the end only: far from the cutoff
    picks, record = module.polish_starts(batch, start, rounds=1)
    assert set(record["distance_after_by_start"]) == {"gates", "cutoff"}
    assert record["distance_after"] == min(record["distance_after_by_start"].values())
    assert sum(module.costs[k] for k in picks) == 7

    leader = PolicySearchModule(model="digits", space="minimal", num_inference_steps=5, budget=7)
    assert leader.hparams.polish_from == "leader"
    picks, record = leader.polish_starts(batch, start, rounds=1)
    before = record["distance_before_by_start"]
    assert set(before) == {"gates", "cutoff"} and before["cutoff"] < before["gates"]
    assert record["start"] == "cutoff" and record["distance_before"] == pytest.approx(before["cutoff"], rel=1e-6)
    assert record["distance_after"] <= record["distance_before"] and sum(leader.costs[k] for k in picks) == 7
    with pytest.raises(ValueError, match="polish_from"):
        PolicySearchModule(model="digits", space="minimal", num_inference_steps=5, budget=7, polish_from="cutoff")


def test_progress_bar_names_the_last_epoch_of_a_step_limited_run():
    """Lightning writes "Epoch 1/-2" when only max_steps limits the run (its max_epochs is -1)."""
    from types import SimpleNamespace

    pytest.importorskip("rich")
    from agsearch.search.callbacks import progress_bar

    bar = progress_bar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=24, num_training_batches=8, accumulate_grad_batches=1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=20, num_training_batches=8, accumulate_grad_batches=2)
    assert bar._get_train_description(0).strip() == "Epoch 0/4"
    bar._trainer = SimpleNamespace(max_epochs=5, max_steps=-1, num_training_batches=8, accumulate_grad_batches=1)
    assert bar._get_train_description(1).strip() == "Epoch 1/4"
