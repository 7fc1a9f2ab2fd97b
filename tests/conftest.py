import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch a hub
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def pipe():
    """The bundled toy model, loaded once with the same code the notebooks use."""
    from helpers.loading import load_pipeline
    return load_pipeline("toy")
