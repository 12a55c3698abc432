import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_ENVS = {}


@pytest.fixture(scope="session")
def make_task_env():
    """Session cache of real environments, one per (task, image_size)."""
    import envs

    def get(task: str, image_size: int = 64):
        key = (task, image_size)
        if key not in _ENVS:
            _ENVS[key] = envs.make_env(task, image_size=image_size)
        return _ENVS[key]

    yield get
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()
