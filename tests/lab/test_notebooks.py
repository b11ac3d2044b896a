"""Every notebook in colab/ runs top to bottom (headless, nbclient) at tiny sizes.

The cell tagged ``parameters`` is followed by an injected cell with the CI
values below (papermill-style); a notebook without one runs as it is.
"""

import json
import os
import sys

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CI_PARAMETERS = {
    "router_lab": 'STEPS = 6\nSEEDS = (0, 1)\nD_MODEL, NUM_LAYERS, SEQ_LEN, BATCH = 32, 2, 32, 4\n'
                  'NUM_EXPERTS, TOP_K, EXPERT_FFN = 4, 2, 16\nDOMAINS = ("email", "json")',
    "optimizer_ablation": 'STEPS = 4\nSEEDS = (0,)\nD_MODEL, SEQ_LEN, BATCH = 32, 32, 4\n'
                          'LRS = {"adamw": [3e-3], "muon": [1e-2], "lion": [1e-3]}',
    "long_context": 'SEQ_LEN = 64\nWINDOW, TOPK = 8, 8\nTRAIN_STEPS = 2\nTRAIN_LEN = 96\n'
                    'LENGTHS, DEPTHS, SAMPLES = [96], [0.5], 2',
    "hf_checkpoint": 'HIDDEN, LAYERS, EXPERTS, TOP_K = 32, 2, 4, 2\nNEW_TOKENS = 4',
    "quickstart": "STEPS = 4",
}


def test_every_notebook_is_listed():
  on_disk = {n[:-len(".ipynb")] for n in os.listdir(os.path.join(REPO, "colab")) if n.endswith(".ipynb")}
  assert on_disk == set(CI_PARAMETERS)


@pytest.mark.parametrize("name", sorted(CI_PARAMETERS))
def test_notebooks_are_stored_without_outputs(name):
  book = nbformat.read(os.path.join(REPO, "colab", f"{name}.ipynb"), as_version=4)
  code = [c for c in book.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert [c for c in code if "parameters" in c.metadata.get("tags", [])] == [code[1]]
  assert any("Colab TPU runtime" in c.source for c in book.cells if c.cell_type == "markdown")
  if name != "quickstart":  # quickstart's install cell finds a local checkout instead (test_cli.py)
    assert code[0].source.startswith("# @title 0. Install")


@pytest.mark.slow(minutes=8)  # all five
@pytest.mark.parametrize("name", sorted(CI_PARAMETERS))
def test_notebook_runs(name, tmp_path, monkeypatch):
  from nbclient import NotebookClient

  book = nbformat.read(os.path.join(REPO, "colab", f"{name}.ipynb"), as_version=4)
  where = next((i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])), None)
  if where is not None:
    book.cells.insert(where + 1, nbformat.v4.new_code_cell(
        CI_PARAMETERS[name] + f"\nWORKDIR = {str(tmp_path / 'work')!r}", metadata={"tags": ["injected-parameters"]}))
  # The kernel sees one CPU device (not the 8 the test session forces) and the checkout on its path.
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("MOEJAX_TEST_XLA_FLAGS", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  # Every notebook writes to WORKDIR; quickstart finds the checkout through the moejax on PYTHONPATH.
  cwd = str(tmp_path / "colab")
  os.makedirs(cwd, exist_ok=True)
  # The kernel is this interpreter (the test's venv), whatever kernelspecs the machine has installed.
  spec = tmp_path / "jupyter" / "kernels" / "moejax-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "moejax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  NotebookClient(book, timeout=600, kernel_name="moejax-test", resources={"metadata": {"path": cwd}}).execute()
