"""notebooks/inspect_policy.ipynb runs top to bottom on a fresh search run (so it cannot rot)."""


from pathlib import Path

import nbformat
from nbclient import NotebookClient

from agsearch.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_inspect_policy_notebook_executes(tmp_path, capsys, monkeypatch):
    code = main(["search", "--model.model=digits", "--model.space=minimal", "--model.num_inference_steps=5", "--model.budget=7", "--data.num_pairs=8",
                 "--data.batch_size=4", "--data.num_val=4", "--trainer.max_steps=4", "--progress=false",
                 "--wandb.mode=disabled", "--eval.samples=20", f"--trainer.default_root_dir={tmp_path}"])
    assert code == 0, capsys.readouterr().err
    (run,) = tmp_path.iterdir()
    monkeypatch.setenv("AGSEARCH_POLICY", str(run / "policy.json"))
    monkeypatch.setenv("AGSEARCH_GATES", str(run / "gates.json"))
    nb = nbformat.read(ROOT / "notebooks" / "inspect_policy.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "searched-minimal-7" in text and "NFE 7 of 10" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the policy, the gate heatmap, the gate history (and the front when swept)


def test_inspect_policy_notebook_on_an_adaptive_run(tmp_path, capsys, monkeypatch):
    code = main(["search", "--model.model=digits", "--model.space=adaptive_cosine", "--model.num_inference_steps=5", "--model.budget=7",
                 "--data.num_pairs=8", "--data.batch_size=4", "--data.num_val=4", "--data.num_calibration=16",
                 "--trainer.max_steps=4", "--progress=false", "--wandb.mode=disabled", "--eval.samples=20",
                 f"--trainer.default_root_dir={tmp_path}"])
    assert code == 0, capsys.readouterr().err
    (run,) = tmp_path.iterdir()
    monkeypatch.setenv("AGSEARCH_POLICY", str(run / "policy.json"))
    monkeypatch.setenv("AGSEARCH_GATES", str(run / "thresholds.json"))
    nb = nbformat.read(ROOT / "notebooks" / "inspect_policy.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "searched-adaptive_cosine-7" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the thresholds, their last epoch over γ, the relaxed NFE history
