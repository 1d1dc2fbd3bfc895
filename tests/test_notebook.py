"""experiments/colab/evaluate.ipynb runs headless (nbclient) on the tiny digits teacher, with its
parameters overridden by an injected cell (papermill style) so the compute stays tiny."""
import json
import os
import shutil

import nbclient
import nbformat

from tests import helpers

NOTEBOOK = os.path.join(helpers.REPO, "experiments", "colab", "evaluate.ipynb")


def _inject(nb, params: dict):
  """A cell that sets `params`, right after the cell tagged 'parameters'."""
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      source, metadata={"tags": ["injected-parameters"]}))


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
  return "\n".join(out)


def test_notebook_runs_headless_on_a_tiny_run(trained, data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "teacher"
  shutil.copytree(trained[0], workdir)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  _inject(nb, dict(workdir=str(workdir), data_dir=str(data_dir), teacher_specs="ancestral:1,"
                   "ancestral:2", classes=[0, 1], per_class=2, num_samples=16, batch_size=8,
                   reference_examples=200))
  # The kernel inherits this process's environment (8 fake devices, CPU, compilation cache);
  # this checkout comes first on its path, so the install cell finds mmd_jax and is skipped.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [helpers.REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = _text(nb)
  assert "already installed" in text
  assert "STAND-IN" in text and "NOT FID" in text
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 3  # two grids (1 and 2 steps) and the plot against the steps
  rows = [json.loads(l) for l in open(workdir / "eval_results.jsonl")]
  rows = [r for r in rows if r.get("tag") == "eval" and r["num_samples"] == 16]
  assert sorted(r["num_steps"] for r in rows) == [1, 2]
  assert all(r["protocol"].startswith("STAND-IN") and r["standin_fd"] > 0 for r in rows)
