import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread per test process: the tiny models gain nothing from more, and on a busy
# 2-core machine OpenMP spinning made a 0.05 s training step take 6-10 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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


_DATASETS = {}


@pytest.fixture(scope="session")
def oracle_data(tmp_path_factory):
    """Session cache of real oracle datasets made by `make data`'s script: (tasks, episodes, px) -> folder."""
    import subprocess

    def get(tasks: list[str], episodes: int, image_size: int = 32):
        key = (tuple(tasks), episodes, image_size)
        if key not in _DATASETS:
            out = tmp_path_factory.mktemp("oracle_data")
            r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_data.py"), f"OUT={out}",
                                f"TASKS={','.join(tasks)}", f"EPISODES={episodes}", f"env.image_size={image_size}"],
                               capture_output=True, text=True, timeout=600, cwd=ROOT)
            assert r.returncode == 0, r.stderr[-2000:]
            _DATASETS[key] = out
        return _DATASETS[key]

    return get


@pytest.fixture
def train_dp_one_step(tmp_path):
    """``make train-dp``'s build from its command-line words (``DATA=...``, ``key=value``), then
    one training step and one validation batch on CPU: returns (module, datamodule, the
    Trainer's callback metrics)."""
    import lightning as L

    def run(words: list[str]):
        sys.path.insert(0, str(ROOT / "scripts"))
        from configs import cli_config
        from train_dp import build

        module, dm = build(cli_config("dp", words, {"DATA": "data_dir", "DATASET": "tasks", "PRESET": "preset"}))
        fit = L.Trainer(max_steps=1, max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", devices=1, default_root_dir=tmp_path,
                        limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0)
        fit.fit(module, datamodule=dm)
        return module, dm, fit.callback_metrics

    return run
