"""Point every notebook (setup cell and Colab badge) and the README's badges at another repository, e.g. your fork.

    python -m helpers.set_repo_url https://github.com/YOU/YOUR-FORK
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URL_RE = re.compile(r'REPO_URL = "https://github\.com/([^/"]+/[^/"]+?)(?:\.git)?"')
BADGE_RE = re.compile(r"colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/")


def set_repo_url(url: str, root: Path = ROOT) -> list[Path]:
    m = re.fullmatch(r"https://github\.com/([^/\s]+)/([^/\s]+?)(?:\.git)?/?", url)
    if not m:
        raise ValueError(f"expected a GitHub repository URL like https://github.com/YOU/YOUR-FORK, got {url!r}")
    slug = f"{m.group(1)}/{m.group(2)}"
    changed = []
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        d = json.loads(nb.read_text())
        for c in d["cells"]:
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            new = URL_RE.sub(f'REPO_URL = "https://github.com/{slug}"', src)
            new = BADGE_RE.sub(f"colab.research.google.com/github/{slug}/blob/", new)
            c["source"] = new
        text = json.dumps(d, indent=1, ensure_ascii=False) + "\n"
        if text != nb.read_text():
            nb.write_text(text)
            changed.append(nb)
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
