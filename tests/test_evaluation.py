import json

import numpy as np
import pytest
import torch

from agsearch.baselines import make_baseline
from agsearch.eval.digits import DigitsEvaluator
from agsearch.eval.records import frechet_distance
from agsearch.guidance.sampler import sample
from agsearch.models.digits import benchmark_settings, load_classifier
from agsearch.models.digits.data import (
    IMAGE_SHAPE,
    load_digits_tensors,
    train_test_split_indices,
)
from agsearch.seeds import make_noise, sample_seeds


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    cov = np.cov(a, rowvar=False)
    assert abs(frechet_distance(a.mean(0), cov, a.mean(0), cov)) < 1e-6
    shift = np.array([1.0, 2.0, 0.0, 0.0])
    assert frechet_distance(a.mean(0) + shift, cov, a.mean(0), cov) == pytest.approx(5.0, abs=1e-6)


def test_shipped_classifier_reads_held_out_digits():
    images, labels = load_digits_tensors()
    _, test = train_test_split_indices(labels)
    with torch.no_grad():
        acc = (load_classifier()(images[test]).argmax(1) == labels[test]).float().mean().item()
    assert acc >= 0.97


def test_eval_seeds_are_held_out_from_search_seeds():
    assert set(sample_seeds(0, 5000)).isdisjoint(sample_seeds(1, 5000))
    assert torch.equal(make_noise(sample_seeds(1, 3), IMAGE_SHAPE), make_noise(sample_seeds(1, 3), IMAGE_SHAPE))


def test_evaluator_same_noise_for_every_policy(random_unet):
    ev = DigitsEvaluator(samples=20, seed=1, progress=False, unet=random_unet)
    cfg = ev.evaluate(make_baseline("cfg", 5, 1.5))
    again = ev.evaluate(make_baseline("cfg", 5, 1.5))
    assert cfg.mse == 0 and again.mse == 0 and cfg.nfe == 10
    other = DigitsEvaluator(samples=20, seed=2, progress=False, unet=random_unet)
    rows = torch.arange(20)
    assert not torch.equal(ev.noise(rows), other.noise(rows))
    with pytest.raises(ValueError, match="at least 2"):
        DigitsEvaluator(samples=1, unet=random_unet)


def test_streamed_scores_do_not_depend_on_the_batch_size(random_unet):
    policies = [make_baseline("cutoff", 5, 1.5, fraction=0.4), make_baseline("cfg", 5, 1.5),
                make_baseline("ag", 5, 1.5, threshold=0.9)]
    whole = DigitsEvaluator(samples=20, seed=1, progress=False, unet=random_unet).records(policies)
    batched = DigitsEvaluator(samples=20, seed=1, batch_size=7, progress=False, unet=random_unet).records(policies)
    for a, b in zip(whole, batched):
        assert a["name"] == b["name"] and a["nfe"] == b["nfe"] and a["accuracy"] == b["accuracy"]
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-5, abs=1e-9) and a["fd"] == pytest.approx(b["fd"], rel=1e-4)
    assert whole[1]["mse"] == 0 and whole[0]["mse"] > 0


def test_full_cfg_runs_once_per_batch_and_is_not_kept_past_the_cache_limit(random_unet, monkeypatch):
    """Memory does not grow with the samples: above REFERENCE_CACHE_BYTES nothing is kept between
    calls and each call samples its reference again; within one call full CFG runs once."""
    import agsearch.eval.base as base

    ev = DigitsEvaluator(samples=12, seed=1, batch_size=5, progress=False, unet=random_unet)
    cutoff = make_baseline("cutoff", 5, 1.5, fraction=0.4)  # 7 NFE of 10
    calls = []
    monkeypatch.setattr(base, "sample", lambda *a, **k: calls.append(a[2].label()) or sample(*a, **k))
    first = ev.records([cutoff, make_baseline("cfg", 5, 1.5)])
    assert len(calls) == 2 * 3 and ev._references  # 3 batches of both policies; full CFG is the reference
    monkeypatch.setattr(base, "REFERENCE_CACHE_BYTES", 0)
    fresh = DigitsEvaluator(samples=12, seed=1, batch_size=5, progress=False, unet=random_unet)
    calls.clear()
    again = fresh.record(cutoff)
    assert len(calls) == 2 * 3 and not fresh._references and again["mse"] == pytest.approx(first[0]["mse"])
    assert fresh.full_cfg_cosines[(5, 1.5)][0].shape == (5, 12)


def test_quick_benchmark_writes_table_and_figures(tmp_path):
    from agsearch.eval.bench import run_benchmark

    records = run_benchmark(tmp_path, samples=20, progress=False, quick=True)
    assert {"benchmark.md", "benchmark.json", "fronts.png", "cosine.png"} <= {p.name for p in tmp_path.iterdir()}
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert len(data["records"]) == len(records) >= 6
    md = (tmp_path / "benchmark.md").read_text()
    assert "| policy |" in md and "## cutoff" in md and "Full CFG" in md
    assert (tmp_path / "fronts.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cfg_beats_conditional_only_on_the_built_in_model():
    s = benchmark_settings()
    ev = DigitsEvaluator(samples=500, seed=3, progress=False)
    cfg = ev.evaluate(make_baseline("cfg", s["num_inference_steps"], s["guidance_scale"]))
    cond = ev.evaluate(make_baseline("cond", s["num_inference_steps"], s["guidance_scale"]))
    assert cfg.accuracy > cond.accuracy + 0.01
