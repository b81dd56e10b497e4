"""Editing evaluation and search on the shapes editor (the untrained editor: the mechanics, at real sizes)."""

import pytest
import torch

import agsearch.models.shapes as shapes
from agsearch.cli import main
from agsearch.policy import Policy, PolicyError
from agsearch.testing import untrained_shapes_editor


@pytest.fixture(scope="module")
def editor():
    return untrained_shapes_editor()


@pytest.fixture
def builtin_editor(monkeypatch, editor):
    """``builtin:shapes_edit`` is the untrained editor (the trained one may not be shipped)."""
    monkeypatch.setattr(shapes, "load_edit_pipeline", lambda device="cpu", **_: editor.to(device))
    return editor


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def edit_policy(ops, scale=4.0, image_scale=1.5):
    return Policy.static(ops, scale, image_guidance_scale=image_scale, conditions=2)


def test_the_edit_evaluator_counts_passes_scores_edits_and_compares_with_full_guidance(editor):
    from agsearch.eval.shapes_edit import ShapesEditEvaluator

    ev = ShapesEditEvaluator(samples=6, batch_size=4, pipe=editor, progress=False)
    assert [e.instruction.kind for e in ev.edits[:4]] == ["recolour", "move", "add", "remove"]
    assert all(e.instruction.held_out() for e in ev.edits)
    full, cond, text = ev.records([edit_policy(["edit"] * 3), edit_policy(["cond"] * 3),
                                   edit_policy(["edit", "text", "text"])])
    assert (full["nfe"], cond["nfe"], text["nfe"]) == (9, 3, 7)
    assert full["mse"] == 0 and cond["mse"] > 0
    assert text["mse"] < 1e-10  # the untrained editor is blind to the image: ε_I = ε_∅, so text guidance is full guidance
    for r in (full, cond, text):
        assert 0 <= r["edited"] <= min(r["edit_success"], r["preservation"]) <= 1
        assert r["edits"] == "heldout" and r["image_guidance_scale"] == 1.5 and r["samples"] == 6
        assert {f"edit_success_{k}" for k in shapes.edits.KINDS} <= set(r)
    for batch_size in (6, 2):  # batches do not matter
        again = ShapesEditEvaluator(samples=6, batch_size=batch_size, pipe=editor, progress=False)
        assert again.record(edit_policy(["cond"] * 3))["mse"] == pytest.approx(cond["mse"], rel=1e-4)
    with pytest.raises(PolicyError, match="two conditions"):
        ev.record(Policy.static(["cfg"] * 3, 4.0))
    with pytest.raises(ValueError, match="unknown edit split"):
        ShapesEditEvaluator(samples=2, split="all", pipe=editor)


def tiny_edit_search(tmp_path, *extra):
    return ["search", "--model.model=shapes_edit", "--model.space=editing", "--model.num_inference_steps=4",
            "--data.num_pairs=4", "--data.batch_size=2", "--data.num_val=2", "--trainer.max_steps=2",
            "--eval.samples=4", "--wandb.mode=disabled", "--progress=false",
            f"--trainer.default_root_dir={tmp_path / 'runs'}", *extra]


def test_search_on_the_shapes_editor_exports_a_two_condition_policy(tmp_path, capsys, builtin_editor):
    out = tmp_path / "policy.json"
    code, stdout, err = run(capsys, *tiny_edit_search(tmp_path, "--model.budget=8", "--model.image_guidance_scale=1.25",
                                                      f"--out={out}"))
    assert code == 0, err
    policy = Policy.load(out)
    assert policy.conditions == 2 and policy.image_guidance_scale == 1.25 and policy.nfe <= 8
    assert all(s["op"] in ("edit", "text", "joint", "cond") for s in policy.steps)
    assert policy.provenance["model"] == "agsearch-shapes-edit"
    assert policy.metrics["eval"]["edits"] == "train"
    assert "edit success %" in stdout and "full guidance" in stdout and "cutoff-" in stdout, stdout


@pytest.mark.parametrize("extra, needle", [
    (["--model.model=shapes_edit", "--model.space=minimal", "--model.budget=6"], "two conditions"),
    (["--model.pipeline=builtin:shapes", "--model.space=minimal", "--model.budget=6",
      "--model.image_guidance_scale=1.5"], "image_guidance_scale"),
    (["--model.model=shapes_edit", "--model.space=editing", "--model.budget=13"], "between 4 and 12"),
    (["--model.model=shapes_edit", "--model.space=adaptive_cosine", "--model.budget=6"], "two-condition space"),
])
def test_a_refused_edit_search_is_one_line_and_leaves_no_run(tmp_path, capsys, builtin_editor, extra, needle):
    argv = [a for a in tiny_edit_search(tmp_path) if not a.startswith(("--model.model", "--model.space"))]
    code, _, err = run(capsys, *argv, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "runs").exists()


def test_the_edit_search_polish_can_start_from_the_cutoff_at_an_odd_surplus(builtin_editor):
    """edit costs 3: at T + odd budgets the cutoff takes one 2-NFE step after its guided ones, so the
    polish still compares the gates with the cutoff at the whole budget."""
    from agsearch.search.gates import PolicySearchModule

    def cutoff(budget):
        module = PolicySearchModule(model="shapes_edit", space="editing", num_inference_steps=4, budget=budget)
        picks = module.cutoff_picks()
        return picks and ([module.candidates[k]["op"] for k in picks], sum(module.costs[k] for k in picks))

    assert cutoff(8) == (["edit", "edit", "cond", "cond"], 8)
    assert cutoff(9) == (["edit", "edit", "text", "cond"], 9)
    assert cutoff(11) == (["edit", "edit", "edit", "text"], 11)
    assert cutoff(12) == (["edit"] * 4, 12)

def test_the_search_backend_encodes_its_training_edits_once(builtin_editor):
    from agsearch.search.backends import ShapesEditBackend

    backend = ShapesEditBackend()
    assert backend.conditions == 2 and backend.num_conditions == len(backend.edits) == 1000
    assert not any(e.instruction.held_out() for e in backend.edits)
    cond = backend.condition(torch.tensor([0, 999]))
    assert cond.image_latents.shape == (2, 8, 8, 8) and cond.prompt_embeds.shape[0] == 2
    assert backend.noise(torch.tensor([3]), "cpu").shape == (1, 8, 8, 8)


def test_the_edit_benchmark_writes_its_files_and_the_cheapest_policy_within_a_point(tmp_path, capsys, builtin_editor):
    searched = tmp_path / "searched.json"
    edit_policy(["edit"] * 10 + ["text"] * 5 + ["cond"] * 10).save(searched)
    out = tmp_path / "bench"
    code, stdout, err = run(capsys, "bench", "--model", "shapes_edit", "--quick", "--samples", 4, "--out-dir", out,
                            "--policy", searched, "--no-progress")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"benchmark.md", "benchmark.json", "fronts.png", "grid.png"}
    records = __import__("json").loads((out / "benchmark.json").read_text())["records"]
    families = [r["family"] for r in records]
    assert families[:5] == ["full", "cond", "text", "joint", "alternating"] and families[-1] == "policy file"
    full = records[0]
    assert full["nfe"] == 75 and full["mse"] == 0 and records[1]["nfe"] == 25 and records[-1]["nfe"] == 50
    md = (out / "benchmark.md").read_text()
    assert "Full guidance" in md and "## image-cutoff" in md and "## policy file" in md
    assert "within 1 point of full guidance's edit success**" in md
    assert "within 1 point of full guidance's edit success and preservation**" in md
    if any(r["edit_success"] >= full["edit_success"] - 0.01 for r in records[1:]):
        assert "% of the NFE saved" in md

    # --resume from the finished run: only an added policy is evaluated, and the files are written again
    added = tmp_path / "added.json"
    edit_policy(["edit"] * 5 + ["cond"] * 20).save(added)
    code, _, err = run(capsys, "bench", "--model", "shapes_edit", "--quick", "--samples", 4, "--out-dir", out,
                       "--policy", searched, "--policy", added, "--resume", "--no-progress")
    assert code == 0, err
    assert f"reusing {len(records)} of {len(records) + 1} policies from {out / 'benchmark.json'}" in err, err
    again = __import__("json").loads((out / "benchmark.json").read_text())["records"]
    assert again[:-1] == records and again[-1]["nfe"] == 35


def test_the_cheapest_policy_within_a_point_can_ask_for_preservation_too():
    from agsearch.eval.shapes_edit_bench import KEPT, cheapest_within

    full = {"nfe": 75, "edit_success": 0.56, "preservation": 0.49}
    text = {"nfe": 50, "edit_success": 0.595, "preservation": 0.385}
    searched = {"nfe": 50, "edit_success": 0.55, "preservation": 0.485}  # exactly 1 point below: within
    ag = {"nfe": 64.6, "edit_success": 0.555, "preservation": 0.483}
    assert cheapest_within([ag, text], full) is text
    assert cheapest_within([ag, text], full, keys=KEPT) is ag
    assert cheapest_within([ag, text, searched], full, keys=KEPT) is searched
    assert cheapest_within([text], full, keys=KEPT) is None


def test_eval_and_bench_refuse_a_policy_for_the_wrong_number_of_conditions_before_sampling(tmp_path, capsys, builtin_editor):
    one, two, out = tmp_path / "one.json", tmp_path / "two.json", tmp_path / "records.json"
    Policy.static(["cfg"] * 25, 4.0).save(one)
    edit_policy(["edit"] * 25).save(two)
    for model, policy in (("shapes_edit", one), ("shapes", two)):
        code, _, err = run(capsys, "eval", "--model", model, "--policy", policy, "--samples", 2, "--json", out)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "condition" in err and str(policy) in err, err
        assert not out.exists()
        code, _, err = run(capsys, "bench", "--model", model, "--policy", policy, "--out-dir", tmp_path / "bench")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "condition" in err, err
        assert not (tmp_path / "bench").exists()
