import json
import shutil

import pytest

from helpers.set_repo_url import ROOT, set_repo_url


def test_rewrites_setup_cells_and_badges(tmp_path):
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    changed = set_repo_url("https://github.com/teacher/fork.git", tmp_path)
    assert tmp_path / "README.md" in changed
    nb = json.loads(sorted((tmp_path / "notebooks").glob("*.ipynb"))[0].read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"])
    assert 'REPO_URL = "https://github.com/teacher/fork"' in text
    assert "colab.research.google.com/github/teacher/fork/blob/main/notebooks/" in text
    assert "github/teacher/fork/blob" in (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="GitHub repository URL"):
        set_repo_url("not a url", tmp_path)
