"""Point every notebook (setup cell and Colab badge) and the README's badges at another repository, e.g. your fork.

    python -m helpers.set_repo_url https://github.com/YOU/YOUR-FORK

Notebooks are rewritten as Jupyter writes them (nbformat), so only the changed links show in `git diff`.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URL_RE = re.compile(r'REPO_URL = "https://github\.com/([^/"]+/[^/"]+?)(?:\.git)?"')
BADGE_RE = re.compile(r"colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/")


def slug_of(url: str) -> str:
    m = re.fullmatch(r"https://github\.com/([^/\s]+)/([^/\s]+?)(?:\.git)?/?", url)
    if not m:
        raise ValueError(f"expected a GitHub repository URL like https://github.com/YOU/YOUR-FORK, got {url!r} "
                         f"(Colab opens notebooks from GitHub only)")
    return f"{m.group(1)}/{m.group(2)}"


def set_repo_url(url: str, root: Path = ROOT) -> list[Path]:
    import nbformat
    slug = slug_of(url)
    changed = []
    for nb_path in sorted((root / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in nb_path.parts:
            continue
        nb = nbformat.read(nb_path, as_version=nbformat.NO_CONVERT)
        dirty = False
        for c in nb.cells:
            new = URL_RE.sub(f'REPO_URL = "https://github.com/{slug}"', c.source)
            new = BADGE_RE.sub(f"colab.research.google.com/github/{slug}/blob/", new)
            if new != c.source:
                c.source, dirty = new, True
        if dirty:
            nbformat.write(nb, nb_path)
            changed.append(nb_path)
    readme = root / "README.md"
    if readme.exists():
        t = readme.read_text()
        new = BADGE_RE.sub(f"colab.research.google.com/github/{slug}/blob/", t)
        if new != t:
            readme.write_text(new)
            changed.append(readme)
    return changed


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for p in set_repo_url(sys.argv[1]):
        print("updated", p.relative_to(ROOT))
