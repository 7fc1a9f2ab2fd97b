"""Every notebook, top to bottom, on the SD-1.5 architecture twin (tests/twins.py): real SD's layout (PNDM config
turned into DDIM by the loader, VAE factor 8, multi-head attention, 77 tokens) with random weights.

On the twin `TOY` is False, so quality asserts that only hold on the trained bundled model are skipped; shape, cost
and consistency asserts run. It executes every notebook once more (minutes); one notebook:
`pytest tests/test_notebooks_twin.py -k 03_`.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TIMEOUT = int(os.environ.get("TWIN_CELL_TIMEOUT", "900"))


@pytest.fixture(scope="module")
def sd15_twin(tmp_path_factory):
    from tests import twins
    return twins.save(tmp_path_factory.mktemp("twin") / "sd15", "sd15")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_the_sd15_twin(path, sd15_twin, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    monkeypatch.setenv("DIFFUSION_MODEL", str(sd15_twin))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(str(path), as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except CellExecutionError as e:
        text = str(e)
        pytest.fail(f"{path.name} failed on the SD-1.5 twin:\n{text[-3000:]}", pytrace=False)
