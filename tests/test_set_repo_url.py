import re
import shutil
import subprocess
import sys

import nbformat
import pytest

from helpers.set_repo_url import ROOT, set_repo_url

BADGE = re.compile(r"colab\.research\.google\.com/github/([^/\s)]+/[^/\s)]+)/blob/main/(notebooks/[^\s)]+\.ipynb)")
REPO = re.compile(r'REPO_URL = "https://github\.com/([^"]+)"')


def links(root):
    """{file: (REPO_URL slugs, [(badge slug, badge target)])} for every notebook and the README."""
    out = {}
    for p in sorted((root / "notebooks").glob("*.ipynb")):
        text = "\n".join(c.source for c in nbformat.read(p, as_version=4).cells)
        out[p.relative_to(root).as_posix()] = (REPO.findall(text), BADGE.findall(text))
    out["README.md"] = ([], BADGE.findall((root / "README.md").read_text()))
    return out


def assert_in_step(root, slug):
    """Every notebook: one REPO_URL and one badge, both on `slug`, the badge opening that very notebook; the README:
    a badge on `slug` for each notebook."""
    found = links(root)
    notebooks = [k for k in found if k.endswith(".ipynb")]
    for name in notebooks:
        repos, badges = found[name]
        assert repos == [slug], name
        assert badges == [(slug, name)], name
    assert sorted(found["README.md"][1]) == [(slug, n) for n in notebooks]


def copy_repo(tmp_path, with_code=False):
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    if with_code:
        shutil.copytree(ROOT / "helpers", tmp_path / "helpers", ignore=shutil.ignore_patterns("__pycache__"))


def test_the_repository_is_in_step():
    slug = REPO.findall(next(c.source for c in nbformat.read(sorted((ROOT / "notebooks").glob("*.ipynb"))[0],
                                                                    as_version=4).cells if "REPO_URL" in c.source))
    assert_in_step(ROOT, slug[0])


def test_rewrites_setup_cells_and_badges_in_step(tmp_path):
    copy_repo(tmp_path)
    before = {p: p.read_text().splitlines() for p in (tmp_path / "notebooks").glob("*.ipynb")}
    changed = set_repo_url("https://github.com/teacher/fork.git", tmp_path)
    assert tmp_path / "README.md" in changed
    assert_in_step(tmp_path, "teacher/fork")
    for p, old in before.items():  # written as Jupyter writes: only the two lines with links change
        new = p.read_text().splitlines()
        assert len(new) == len(old)
        assert sum(a != b for a, b in zip(old, new)) == 2, p.name
    assert set_repo_url("https://github.com/teacher/fork", tmp_path) == []  # idempotent
    with pytest.raises(ValueError, match="GitHub repository URL"):
        set_repo_url("not a url", tmp_path)


def test_command_line(tmp_path):
    """The teacher's command, as TEACHING.md and the README give it, on a copy of the repository."""
    copy_repo(tmp_path, with_code=True)
    out = subprocess.run([sys.executable, "-m", "helpers.set_repo_url", "https://github.com/YOU/YOUR-FORK"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "updated README.md" in out.stdout
    assert_in_step(tmp_path, "YOU/YOUR-FORK")
