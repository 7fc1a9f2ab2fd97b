"""The notebooks' setup cell, kept here once: `SETUP_CELL`, and `sync_setup_cells(paths)` to write it into notebooks.

On Colab the cell clones the repository (from the notebook's `REPO_URL`) and installs requirements.txt with the
preinstalled torch held at its version (a pip constraint), once per runtime: running it again, or after a kernel
restart, does nothing. Everywhere it makes waiting CPU threads sleep (`OMP_WAIT_POLICY=PASSIVE`, before torch is
imported; see bench/threads_under_load.py) and makes `helpers` importable. tests/test_colab_setup.py runs it as
Colab would.

    python -m helpers.colab notebooks/*.ipynb   # rewrite the setup cell of these notebooks (keeps each REPO_URL)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

DEFAULT_REPO_URL = "https://github.com/diffusion-segmentation-course/diffusion-segmentation-course"
MARKER = "# On Colab only"
REPO_URL_RE = re.compile(r'^REPO_URL = "([^"]*)"$', re.M)

SETUP_CELL = f'''\
# On Colab only: fetch the repository and install what Colab lacks (Colab's torch stays as it is).
# Teachers: point REPO_URL at your fork. Elsewhere this cell only makes `helpers` importable.
import os, sys, subprocess
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep (before torch loads)
REPO_URL = "{DEFAULT_REPO_URL}"
if "google.colab" in sys.modules and not Path("helpers").is_dir():
    if not Path("repo").exists():
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "repo"], check=True)
    if not Path("repo/.installed").exists():  # once per runtime, even after a kernel restart
        torches = ("torch", "torchvision", "torchaudio")  # Colab's builds: pip may not change them
        held = [f"{{n}}=={{version(n)}}" for n in torches if find_spec(n)]
        Path("repo/.held.txt").write_text("\\n".join(held) + "\\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "repo/requirements.txt",
                        "-c", "repo/.held.txt"], check=True)
        Path("repo/.installed").touch()
    os.chdir("repo")
root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "helpers").is_dir())
if str(root) not in sys.path:
    sys.path.insert(0, str(root))'''


def cell_source(repo_url: str = DEFAULT_REPO_URL) -> str:
    """SETUP_CELL with another REPO_URL."""
    return REPO_URL_RE.sub(f'REPO_URL = "{repo_url}"', SETUP_CELL)


def is_setup_cell(cell) -> bool:
    src = cell.source if isinstance(cell.source, str) else "".join(cell.source)
    return cell.cell_type == "code" and src.startswith(MARKER)


def sync_setup_cells(paths, repo_url: str | None = None) -> list[Path]:
    """Replace the setup cell (the code cell starting "# On Colab only") of each notebook by SETUP_CELL, keeping the
    notebook's own REPO_URL (a teacher's fork) unless `repo_url` is given. Cell ids, metadata and outputs stay;
    a notebook without a setup cell is an error. Returns the notebooks that changed."""
    import nbformat
    changed = []
    for p in map(Path, paths):
        nb = nbformat.read(p, as_version=nbformat.NO_CONVERT)
        cells = [c for c in nb.cells if is_setup_cell(c)]
        if len(cells) != 1:
            raise ValueError(f"{p}: expected one setup cell starting {MARKER!r}, found {len(cells)}")
        cell = cells[0]
        url = repo_url or (REPO_URL_RE.search(cell.source) or [None, DEFAULT_REPO_URL])[1]
        new = cell_source(url)
        if cell.source != new:
            cell.source = new
            nbformat.write(nb, p)
            changed.append(p)
    return changed


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    missing = [a for a in sys.argv[1:] if not Path(a).is_file()]
    if missing:
        sys.exit(f"no such notebook: {', '.join(missing)}\n{__doc__}")
    for p in sync_setup_cells(sys.argv[1:]):
        print("updated", p)
