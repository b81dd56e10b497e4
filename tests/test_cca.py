"""CCA (agsearch/cca.py, cca_cli.py) and the AR digits model (agsearch/models/digits_ar/__init__.py)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from agsearch.cca import CCAModule, cca_loss, make_conditions
from agsearch.cli import main
from agsearch.models.digits.data import NULL_CLASS
from agsearch.models.digits_ar import (
    DigitsAR,
    DigitsARConfig,
    generate,
    images_to_tokens,
    load_model,
    save_model,
    tokens_to_images,
)


def direct_cca_loss(logp, ref_logp, neg_logp, neg_ref_logp, c, c_neg, beta, lam):
    """The formula of DESIGN.md transcribed term by term, per pair, in plain Python floats."""
    logsig = lambda z: -math.log1p(math.exp(-z))
    pos_terms, neg_terms = [], []
    for i in range(len(c)):
        pos_terms.append(-logsig(beta * (logp[i] - ref_logp[i])))
        r_neg = neg_logp[i] - neg_ref_logp[i]
        if c_neg[i] == c[i]:  # collision or null pair: a positive, weight 1
            neg_terms.append(-logsig(beta * r_neg))
        else:
            neg_terms.append(-lam * logsig(-beta * r_neg))
    n = len(c)
    return (sum(pos_terms) / n + sum(neg_terms) / n) / max(lam, 1.0)


@pytest.mark.parametrize("beta,lam", [(0.02, 100.0), (0.5, 0.3), (1.0, 0.0), (0.02, 1000.0)])
def test_cca_loss_matches_the_formula_with_collisions_and_nulls(beta, lam):
    g = torch.Generator().manual_seed(0)
    B = 12
    labels = torch.tensor([3, 3, 1, 4, 4, 4, 0, 9, 2, 2, 7, 5])  # repeats → collisions after the roll
    c, c_neg, neg_pos = make_conditions(labels, 0.3, torch.Generator().manual_seed(1))
    assert (c == NULL_CLASS).any() and ((c_neg == c) & (c != NULL_CLASS)).any()  # both special cases occur
    logp, ref, nlogp, nref = (-200 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4))
    got = cca_loss(logp - ref, nlogp - nref, neg_pos, beta, lam)
    want = direct_cca_loss(logp.tolist(), ref.tolist(), nlogp.tolist(), nref.tolist(), c.tolist(), c_neg.tolist(), beta, lam)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_make_conditions_rolls_and_nulls():
    labels = torch.tensor([0, 1, 2, 2, 5])
    c, c_neg, neg_pos = make_conditions(labels, 0.0)
    assert c.tolist() == [0, 1, 2, 2, 5] and c_neg.tolist() == [5, 0, 1, 2, 2]
    assert neg_pos.tolist() == [False, False, False, True, False]  # the 2 rolled onto a 2
    c, c_neg, neg_pos = make_conditions(labels, 0.999999)
    assert (c == NULL_CLASS).all() and (c_neg == NULL_CLASS).all() and neg_pos.all()


@pytest.fixture(scope="module")
def random_ar(tmp_path_factory):
    """A small DigitsAR with seeded random weights, saved as safetensors (+ config)."""
    torch.manual_seed(0)
    model = DigitsAR(DigitsARConfig(d_model=32, n_layers=2, n_heads=2)).eval()
    path = tmp_path_factory.mktemp("ar") / "ar.safetensors"
    save_model(model, path)
    return model, path


def test_kv_cache_cfg_and_per_sample_seeds(random_ar):
    model, _ = random_ar
    labels, seeds = torch.tensor([0, 3, 7, 9]), [11, 12, 13, 14]
    for s in (1.0, 2.5):
        assert torch.equal(generate(model, labels, seeds, s), generate(model, labels, seeds, s, use_cache=False))
    full = generate(model, labels, seeds, 2.5)
    assert torch.equal(generate(model, labels[2:], seeds[2:], 2.5), full[2:])  # independent of the batch
    assert full.min() >= 0 and full.max() <= 16
    assert torch.equal(generate(model, labels, seeds, 1.0, top_k=1), generate(model, labels, [0, 1, 2, 3], 1.0, top_k=1))
    images = tokens_to_images(full)
    assert images.shape == (4, 1, 8, 8) and torch.equal(images_to_tokens(images), full)


def test_log_likelihood_is_the_sum_over_tokens(random_ar):
    model, _ = random_ar
    x, c = torch.randint(0, 17, (3, 64)), torch.tensor([1, 2, NULL_CLASS])
    logp = model(x, c).log_softmax(-1)
    want = torch.stack([sum(logp[b, t, x[b, t]] for t in range(64)) for b in range(3)])
    assert torch.allclose(model.log_likelihood(x, c), want, atol=1e-4)


def test_module_starts_at_zero_ratio_and_keeps_the_reference_out(random_ar, tmp_path):
    _, path = random_ar
    module = CCAModule(reference=str(path), beta=0.02, lam=10.0)
    x, labels = torch.randint(0, 17, (8, 64)), torch.arange(8)
    c, c_neg, neg_pos = make_conditions(labels, 0.0)
    pos, neg = module.log_ratios(x, c, c_neg)
    assert torch.allclose(pos, torch.zeros(8), atol=1e-4) and torch.allclose(neg, torch.zeros(8), atol=1e-4)
    assert cca_loss(pos, neg, neg_pos, 0.02, 10.0).item() == pytest.approx((1 + 10) * math.log(2) / 10, rel=1e-3)
    assert all(not k.startswith("reference.") for k in module.state_dict())
    assert not any(p.requires_grad for p in module.reference.parameters())
    assert {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]} == {id(p) for p in module.model.parameters()}


def test_load_model_rejects_a_mismatched_checkpoint(random_ar, tmp_path):
    _, path = random_ar
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes())  # weights of the small config, without its JSON: built-in config
    with pytest.raises(ValueError, match="does not match the DigitsAR model"):
        load_model(bad)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("option,needle", [
    ("--model.beta=0", "beta > 0"), ("--model.beta=-1", "beta > 0"), ("--model.lam=-0.5", "lam"),
    ("--model.null_ratio=1.0", "null_ratio in [0, 1)"), ("--model.null_ratio=-0.1", "null_ratio"),
    ("--data.batch_size=1", "batch_size >= 2"), ("--eval.samples=1", "eval.samples"),
])
def test_cca_cli_bad_options_exit_2(capsys, tmp_path, option, needle):
    code, out, err = run_cli(capsys, "cca", option, f"--out={tmp_path / 'run'}", "--wandb.mode=disabled")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cca_cli_mismatched_reference_exits_2(capsys, tmp_path, random_ar):
    _, path = random_ar
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes())
    code, _, err = run_cli(capsys, "cca", f"--model.reference={bad}", f"--out={tmp_path / 'run'}")
    assert code == 2 and "does not match the DigitsAR model" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "cca", f"--model.reference={tmp_path / 'missing.safetensors'}")
    assert code == 2 and "not found" in err


def test_cca_cli_runs_writes_weights_results_and_wandb_offline_files(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "agsearch.cli", "cca", "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
         "--data.batch_size=16", "--eval.samples=20", "--eval.scales=[2.0]", "--progress=false", f"--out={out}"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    tuned = load_model(out / "digits_ar_cca.safetensors")
    assert isinstance(tuned, DigitsAR)
    rows = json.loads((out / "results.json").read_text())
    assert [r["nfe_per_token"] for r in rows] == [1, 2, 1, 2]
    assert [r["name"] for r in rows][0] == "base, no guidance" and rows[2]["name"] == "CCA, no guidance"
    assert all({"name", "nfe_per_token", "accuracy", "fd"} <= set(r) and r["samples"] == 20 for r in rows)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("model.") for k in ckpt["state_dict"])
    (run,) = (out / "wandb").glob("offline-run-*")
    history = next(run.glob("*.wandb")).read_bytes()  # offline: the logged rows live in the run file
    for key in ("train/loss", "train/pos_log_ratio", "train/neg_log_ratio", "train/pos_gt_neg"):
        assert key.encode() in history
