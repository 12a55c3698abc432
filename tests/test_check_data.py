"""`make check-data`: finding and quarantining bad episode files, and training refusing them
before its first step (real datasets written by `make data`, really damaged)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from datamodules import schema
from datamodules.check import check_dataset, check_episode

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["Topple"]


def run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def dataset(oracle_data, tmp_path):
    """A private copy of a 3-episode Topple dataset (tests damage it)."""
    out = tmp_path / "data"
    shutil.copytree(oracle_data(TASKS, 3), out)
    return out


def episode_files(folder: Path) -> list[Path]:
    return sorted((folder / "Topple").glob("seed_*.h5"))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_sound_dataset_checks_clean(dataset):
    counts, problems = check_dataset(dataset)
    assert counts == {"Topple": 3} and problems == []
    r = run("check_data.py", f"DATA={dataset}", "progress=false")
    assert r.returncode == 0, r.stderr
    assert "all 3 episodes are sound" in r.stdout


def test_each_kind_of_damage_is_found(dataset):
    a, b, c = episode_files(dataset)
    truncate(a)
    with h5py.File(b, "a") as f:  # a length that disagrees with num_steps
        del f["episode/actions"]
        f["episode/actions"] = f["episode/obs/qpos"][:-1, :7]
    with h5py.File(c, "a") as f:  # a label that is not API code
        code = f["episode/labels/oracle/code"]
        labels = list(code.asstr()[:])
        labels[0] = "topple(get_actor('x'"
        del f["episode/labels/oracle/code"]
        f["episode/labels/oracle"].create_dataset("code", data=labels, dtype=schema.STR)
    assert "does not open" in check_episode(a)
    assert "rows" in check_episode(b)
    assert "does not parse" in check_episode(c)
    assert check_episode(c, parse_labels=False) is None  # the quick form skips the labels
    _, problems = check_dataset(dataset)
    assert [p.seed for p in problems] == [int(p.stem[5:]) for p in (a, b, c)]


def test_training_refuses_a_truncated_episode_before_its_first_step(dataset, tmp_path):
    truncate(episode_files(dataset)[1])
    out = tmp_path / "run"
    r = run("train_dp.py", f"DATA={dataset}", "DATASET=Topple", f"OUT={out}", "trainer.max_steps=2")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "REPAIR=1" in lines[0], r.stderr
    assert "seed_" in lines[0]
    assert not (out / "checkpoints").exists()


def test_repair_quarantines_and_make_data_regenerates(dataset):
    bad = episode_files(dataset)[0]
    truncate(bad)
    r = run("check_data.py", f"DATA={dataset}", "progress=false")
    assert r.returncode == 1 and "REPAIR=1" in r.stderr
    assert bad.exists()  # checking alone changes nothing
    r = run("check_data.py", f"DATA={dataset}", "REPAIR=1", "progress=false")
    assert r.returncode == 0, r.stderr
    assert not bad.exists() and (dataset / "quarantine" / "Topple" / bad.name).exists()
    with schema.open_index(dataset / "Topple.h5") as f:
        assert bad.stem not in f["episodes"] and len(f["episodes"]) == 2
    assert check_dataset(dataset)[1] == []
    r = run("generate_data.py", f"OUT={dataset}", "TASKS=Topple", "EPISODES=3", "env.image_size=32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert bad.exists() and check_episode(bad) is None  # the same seed, regenerated
    with schema.open_index(dataset / "Topple.h5") as f:
        assert len(f["episodes"]) == 3


def test_check_data_bad_input(tmp_path):
    r = run("check_data.py", f"DATA={tmp_path / 'nope'}")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    r = run("check_data.py", f"DATA={tmp_path / 'empty'}")
    assert r.returncode == 2 and "no task index files" in r.stderr
