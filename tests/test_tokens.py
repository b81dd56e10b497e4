"""Token policies for the AR model (agsearch/tokens.py), their search (agsearch/search/tokens.py),
the policy file's token axis and the front (agsearch/eval/tokens_front.py)."""

import itertools
import json

import pytest
import torch

from agsearch.cli import main
from agsearch.guidance.controllers import controller_for
from agsearch.guidance.ops import cfg
from agsearch.models.digits.data import NULL_CLASS
from agsearch.models.digits_ar import SEQ_LEN, DigitsAR, DigitsARConfig, _draw, generate, load_model, sample_uniforms
from agsearch.policy import Policy, PolicyError
from agsearch.search.tokens import budget_positions, expected_positions, search_token_policy
from agsearch.tokens import adaptive_policy, cutoff_policy, divergence, generate_with_policy

LABELS = torch.tensor([0, 3, 7, 9, 1, 4])
SEEDS = [11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return DigitsAR(DigitsARConfig(d_model=32, n_layers=2, n_heads=2)).eval()


def reference_sample(model, labels, seeds, scales):
    """No cache, no skipping: every token from full forwards of both streams, mixed at scales[t]
    (1: cond). What any token policy must reproduce."""
    u = sample_uniforms(seeds)
    tokens = torch.zeros(len(labels), SEQ_LEN, dtype=torch.long)
    for t in range(SEQ_LEN):
        with torch.no_grad():
            lc = model(tokens, labels)[:, t]
            lu = model(tokens, torch.full_like(labels, NULL_CLASS))[:, t]
        tokens[:, t] = _draw(cfg(lc, lu, scales[t]) if scales[t] != 1 else lc, u[:, t], 1.0, None)
    return tokens


def test_full_cfg_policy_reproduces_cfg_sampling_token_for_token(model):
    run = generate_with_policy(model, LABELS, SEEDS, cutoff_policy(SEQ_LEN, 3.0))
    assert torch.equal(run.tokens, generate(model, LABELS, SEEDS, 3.0))
    assert run.uncond_passes.tolist() == [SEQ_LEN] * len(LABELS) and run.passes_per_token == 2.0
    run = generate_with_policy(model, LABELS, SEEDS, cutoff_policy(0, 3.0))
    assert torch.equal(run.tokens, generate(model, LABELS, SEEDS, 1.0))
    assert run.uncond_passes.tolist() == [0] * len(LABELS) and run.passes_per_token == 1.0


def test_a_resumed_unconditional_stream_catches_up_exactly_and_pays_for_it(random_model):
    """cfg, then a stretch of cond, then cfg again at other scales: the stream computes the skipped
    positions when it resumes (one multi-position pass), so its logits are the no-cache reference's,
    and the skipped positions count."""
    ops = [{"op": "cfg", "scale": 2.0}] * 5 + [{"op": "cond"}] * 10 + [{"op": "cfg", "scale": 4.0}] * 6 \
        + [{"op": "cond"}] * (SEQ_LEN - 21)
    policy = Policy.static(ops, 3.0, axis="tokens")
    assert policy.nfe == SEQ_LEN + 21  # every position up to the last guided one
    labels, seeds = LABELS[:4], SEEDS[:4]
    run = generate_with_policy(random_model, labels, seeds, policy)
    scales = [float(s.get("scale", 1.0)) for s in ops]
    assert torch.equal(run.tokens, reference_sample(random_model, labels, seeds, scales))
    assert run.uncond_passes.tolist() == [21] * 4


def test_multi_position_step_after_a_cache_equals_the_full_forward(random_model):
    tokens = torch.randint(0, 17, (3, SEQ_LEN))
    labels = torch.tensor([1, 2, NULL_CLASS])
    with torch.no_grad():
        full = random_model(tokens, labels)
        caches = [[] for _ in random_model.blocks]
        from agsearch.tokens import _inputs

        random_model.step(_inputs(random_model, labels, tokens, 0, 7), 0, caches)  # positions 0–6
        out = random_model.step(_inputs(random_model, labels, tokens, 7, 20), 7, caches)  # 7–19 after a cache
    torch.testing.assert_close(out, full[:, 19], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("measure, threshold", [("kl", 0.1), ("cosine", 0.02)])
def test_adaptive_rule_is_per_sample_one_way_and_pays_for_what_it_guides(model, measure, threshold):
    policy = adaptive_policy(measure, threshold, 3.0, patience=3, warmup=8)
    run = generate_with_policy(model, LABELS, SEEDS, policy)
    stops = run.stops.tolist()
    assert all(8 + 3 <= s <= SEQ_LEN for s in stops)  # the rule is not checked before token 8
    assert run.uncond_passes.tolist() == stops  # guided tokens 0 … stop − 1, nothing after
    assert len(set(stops)) > 1  # per sample
    for i, stop in enumerate(stops):  # each sample is its own cutoff, sampled alone
        alone = generate_with_policy(model, LABELS[i:i + 1], SEEDS[i:i + 1], cutoff_policy(stop, 3.0))
        assert torch.equal(alone.tokens, run.tokens[i:i + 1])


def test_divergences():
    lc = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    assert torch.allclose(divergence(lc, lc + 7.0, "kl"), torch.zeros(2), atol=1e-6)  # shift-invariant
    assert torch.allclose(divergence(lc, 2 * lc, "cosine"), torch.zeros(2), atol=1e-6)
    assert (divergence(lc, lc.flip(-1), "kl") > 0).all() and (divergence(lc, -lc, "cosine") > 1.9).all()
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(lc, lc, "l2")


def test_token_policy_file_round_trip_and_refusals(tmp_path):
    policy = Policy.static([{"op": "cfg", "scale": 2.5}] * 3 + ["cond"] * (SEQ_LEN - 3), 3.0, axis="tokens")
    path = policy.save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert doc["axis"] == "tokens" and doc["nfe"] == SEQ_LEN + 3
    assert Policy.load(path) == policy
    rule = adaptive_policy("kl", 0.1, 3.0, patience=2)
    assert Policy.loads(rule.dumps()) == rule and rule.label() == "kl-0.1-p2"
    bad = [
        (dict(doc, steps=[{"op": "uncond"}] + doc["steps"][1:]), "not a token op", "/steps/0/op"),
        (dict(doc, nfe=SEQ_LEN + 1), "does not match", "/nfe"),
        ({**json.loads(Policy.adaptive(SEQ_LEN, 3.0, 0.9).dumps()), "axis": "tokens"}, "diffusion rule", "/rule/rule"),
        ({k: v for k, v in json.loads(rule.dumps()).items() if k != "axis"}, "rule over tokens", "/rule/rule"),
        ({**json.loads(rule.dumps()), "rule": {"rule": "token_divergence", "measure": "l1", "threshold": 1}}, "l1", "/rule/measure"),
    ]
    for document, needle, pointer in bad:
        with pytest.raises(PolicyError, match=needle) as info:
            Policy.from_dict(document)
        assert info.value.pointer == pointer
    # the wrong sampler, and the wrong token count
    with pytest.raises(PolicyError, match="cannot run on a diffusion sampler"):
        controller_for(policy)
    with pytest.raises(PolicyError, match="cannot run on a diffusion sampler"):
        policy.for_steps(SEQ_LEN)
    with pytest.raises(PolicyError, match="over an AR model's tokens"):
        generate_with_policy(load_model(), LABELS, SEEDS, Policy.static(["cfg"] * SEQ_LEN, 3.0))
    with pytest.raises(PolicyError, match="policy has 10 tokens but the model generates 64"):
        generate_with_policy(load_model(), LABELS, SEEDS, Policy.static(["cfg"] * 10, 3.0, axis="tokens"))


def test_cli_refuses_policies_of_the_other_kind_with_one_line(tmp_path, capsys):
    token = cutoff_policy(16, 3.0).save(tmp_path / "token.json")
    diffusion = Policy.static(["cfg"] * 25, 1.5).save(tmp_path / "diffusion.json")
    for argv, needle in [
        (["eval", "--model", "digits", "--policy", str(token), "--samples", "2"], "cannot run on a diffusion sampler"),
        (["ar-front", "--policy", str(diffusion), "--out-dir", str(tmp_path / "f")], "over an AR model's tokens"),
        (["ar-front", "--budgets", "2.5", "--out-dir", str(tmp_path / "f")], "passes per token in [1, 2]"),
        (["ar-search", "--budget", "0.5", "--out", str(tmp_path / "s.json")], "passes per token in [1, 2]"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "f").exists() and not (tmp_path / "s.json").exists()


def test_expected_positions_is_the_expectation_over_gate_draws():
    g = torch.zeros(SEQ_LEN)
    idx = [2, 5, 9, 30]
    g[idx] = torch.tensor([0.9, 0.2, 0.6, 0.3])
    expected = 0.0
    for bits in itertools.product([0, 1], repeat=len(idx)):
        p = 1.0
        for b, i in zip(bits, idx):
            p *= float(g[i]) if b else 1 - float(g[i])
        on = [i for b, i in zip(bits, idx) if b]
        expected += p * (max(on) + 1 if on else 0)
    assert abs(float(expected_positions(g)) - expected) < 1e-5
    assert budget_positions(1.25) == 16 and budget_positions(2.0) == 64 and budget_positions(1.0) == 0


def test_token_search_exports_a_seeded_policy_within_its_budget():
    a, _, module = search_token_policy(1.25, steps=2, seed=0, batch_size=4)
    b, _, _ = search_token_policy(1.25, steps=2, seed=0, batch_size=4)
    assert a.axis == "tokens" and a.nfe <= SEQ_LEN + 16 and a.to_dict()["steps"] == b.to_dict()["steps"]
    assert a.provenance["search"]["budget_passes_per_token"] == 1.25
    labels = torch.tensor([1, 2])
    kl = module.rollout_kl(labels).mean()
    kl.backward()
    assert module.gate_logits.grad.abs().sum() > 0 and module.scale_params.grad.abs().sum() > 0


def test_front_writes_its_table_json_and_plot(tmp_path):
    from agsearch.eval.tokens_front import run_front

    rows = run_front(tmp_path, samples=20, budgets=(1.25,), cutoffs=(16,), rules=(("kl", 0.1),), search_steps=1,
                     cca_steps=2, log=lambda *_: None)
    assert {(r["model"], r["family"]) for r in rows} >= {("base", "full CFG"), ("CCA", "no guidance"),
                                                         ("base", "searched"), ("CCA", "adaptive kl")}
    assert all(1.0 <= r["passes_per_token"] <= 2.0 and 0 <= r["accuracy"] <= 1 for r in rows)
    base_cfg = next(r for r in rows if r["model"] == "base" and r["family"] == "full CFG")
    assert base_cfg["passes_per_token"] == 2.0 and base_cfg["seq_kl"] == pytest.approx(0.0, abs=1e-5)
    text = (tmp_path / "front.md").read_text()
    assert "## Best at each budget" in text and "| 1.25 |" in text
    assert json.loads((tmp_path / "front.json").read_text())["rows"] == rows
    assert (tmp_path / "front.png").stat().st_size > 1000
    assert Policy.load(tmp_path / "policies" / "searched-1.25.json").axis == "tokens"
