"""Oracle data generation to HDF5 with the real simulator: schema, labels, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from datamodules import schema
from datamodules.labels import is_key_step

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate_data.py"


def _generate(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(SCRIPT), f"OUT={out}", "env.image_size=32", *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    _generate(out, "TASKS=PlaceNextTo,Swap", "EPISODES=2")
    return out


def test_index_manifest_and_episode_schema(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["format"] == schema.FORMAT and manifest["version"] == schema.VERSION
    for task in ("PlaceNextTo", "Swap"):
        info = manifest["tasks"][task]
        assert info["episodes"] == 2 and info["seeds"] == sorted(info["seeds"])
        with schema.open_index(dataset / f"{task}.h5") as f:
            names = list(f["episodes"])
            assert names == [schema.episode_name(s) for s in info["seeds"]]
            ep = f["episodes"][names[0]]
            T = int(ep.attrs["num_steps"])
            assert ep.attrs["task"] == task and bool(ep.attrs["success"])
            assert ep["obs/base_rgb"].shape == (T, 32, 32, 3) and ep["obs/base_rgb"].dtype == np.uint8
            assert ep["obs/base_rgb"].chunks == (1, 32, 32, 3) and ep["obs/base_rgb"].compression
            assert ep["obs/wrist_rgb"].shape == (T, 32, 32, 3)
            assert ep["obs/qpos"].shape == (T, 7) and ep["obs/tcp_pose"].shape == (T, 7)
            assert ep["obs/suction"].shape == (T, 2)
            assert ep["obs/bboxes"].shape == (T, 3, 4)
            assert ep["actions"].shape == (T, 7) and ep["actions"].dtype == np.float32
            assert ep["success"][-1] and not ep["success"][0]
            assert list(ep["objects/name"].asstr()[:]) == [f"{c} {s}" for c, s in
                                                         zip(ep["objects/colour"].asstr()[:], ep["objects/shape"].asstr()[:])]
            code = list(ep["labels/oracle/code"].asstr()[:])
            key = ep["labels/oracle/key_step"][:]
            assert len(code) == T and key[0]
            assert [is_key_step(c) for c in code] == list(key)
            for prev, cur, k in zip(code, code[1:], key[1:]):
                if not k:  # later steps of a call: the same line, commented out
                    assert cur == "# " + prev.removeprefix("# ")
            assert code[-1] == "done()"


def test_same_command_gives_identical_labels_and_actions(dataset, tmp_path):
    _generate(tmp_path, "TASKS=PlaceNextTo", "EPISODES=2", "WORKERS=2")
    with schema.open_index(dataset / "PlaceNextTo.h5") as a, schema.open_index(tmp_path / "PlaceNextTo.h5") as b:
        assert list(a["episodes"]) == list(b["episodes"])
        for name in a["episodes"]:
            ea, eb = a["episodes"][name], b["episodes"][name]
            np.testing.assert_array_equal(ea["actions"][:], eb["actions"][:])
            assert list(ea["labels/oracle/code"].asstr()[:]) == list(eb["labels/oracle/code"].asstr()[:])


def test_rerun_is_a_no_op(dataset):
    before = {p: p.stat().st_mtime_ns for p in (dataset / "Swap").iterdir()}
    r = _generate(dataset, "TASKS=Swap", "EPISODES=2")
    assert "Swap" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in (dataset / "Swap").iterdir()} == before


def test_kill_9_then_rerun_completes_without_duplicates(tmp_path):
    cmd = [sys.executable, str(SCRIPT), f"OUT={tmp_path}", "env.image_size=32", "TASKS=PlaceOnTop", "EPISODES=6"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    folder = tmp_path / "PlaceOnTop"
    deadline = time.time() + 300
    while time.time() < deadline:
        if folder.is_dir() and len([p for p in folder.iterdir() if p.suffix == ".h5"]) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the generator and its workers
    proc.wait()
    done_before = sorted(p.name for p in folder.iterdir() if p.suffix == ".h5")
    assert 2 <= len(done_before) < 6
    _generate(tmp_path, "TASKS=PlaceOnTop", "EPISODES=6")
    with schema.open_index(tmp_path / "PlaceOnTop.h5") as f:
        names = list(f["episodes"])
        assert names == [schema.episode_name(s) for s in range(6)]  # exact coverage, seed order
        for name in names:
            ep = f["episodes"][name]
            assert bool(ep.attrs["success"]) and ep["actions"].shape[0] == ep.attrs["num_steps"]
            ep["obs/base_rgb"][-1]  # readable to the last frame
    # episodes finished before the kill were kept, not rewritten
    for name in done_before:
        assert (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("args, message", [
    (["TASKS=Nope"], "unknown task or level 'Nope'"),
    (["EPISODE=3"], "unknown variable EPISODE="),
    (["env.imagesize=3"], "valid keys here: ['backend', 'image_size']"),
    (["episodes=many"], "expected int"),
    (["EPISODES=-3"], "episodes=-3 in data: must be >= 1"),
    (["env.image_size=-5"], "env.image_size=-5 in data: must be in [16, 1024]"),
    (["WORKERS=-2"], "workers=-2 in data: must be >= 0"),
    (["oracle_speed=[1.0,0.5]"], "oracle_speed=[1.0, 0.5]: expected [lo, hi]"),
    (["POLICY=bogus"], "POLICY=bogus: data is generated by one of ['oracle', 'vlm_oracle']"),
    (["POLICY=vlm_oracle"], "POLICY=vlm_oracle needs VLM=<export folder of make train-vlm>"),
    (["POLICY=vlm_oracle", "VLM=/nonexistent/export"], "VLM=/nonexistent/export: no such exported VLM folder"),
    (["POLICY=vlm_oracle", "oracle_speed=[0.6,1.0]"], "oracle_speed applies to POLICY=oracle only"),
    (["oracle_travel_height=[0.3,0.3]"], "oracle_travel_height=[0.3, 0.3]: expected [lo, hi] with 0.08 <= lo"),
    (["oracle_travel_height=0.15"], "oracle_travel_height"),
])
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    r = _generate(out, *args, check=False)
    assert r.returncode == 2
    assert message in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not out.exists()


def _varied_episodes(dataset: Path, varied: Path):
    """(reference, varied) ``episode`` groups of PlaceNextTo seeds 0 and 1, each pair checked to
    have the same scene and code program (an oracle variation changes neither)."""
    code = lambda e: [c for c, k in zip(e["labels/oracle/code"][:], e["labels/oracle/key_step"][:]) if k]
    for seed in (0, 1):
        name = schema.episode_name(seed) + ".h5"
        with h5py.File(dataset / "PlaceNextTo" / name) as a, h5py.File(varied / "PlaceNextTo" / name) as b:
            ea, eb = a["episode"], b["episode"]
            assert np.array_equal(ea["obs/base_rgb"][0], eb["obs/base_rgb"][0])  # same scene
            assert code(ea) == code(eb)
            yield ea, eb


def test_oracle_speed_varies_how_long_skills_run_not_the_scenes(dataset, tmp_path):
    """oracle_speed=[lo,hi]: each seed's oracle runs at its own speed factor; the scene and the
    code program are the seed's, the episode is longer; a folder keeps one speed setting."""
    r = _generate(tmp_path, "TASKS=PlaceNextTo", "EPISODES=2", "oracle_speed=[0.6,0.6]")
    assert r.returncode == 0
    for ea, eb in _varied_episodes(dataset, tmp_path):
        assert len(eb["actions"]) > 1.3 * len(ea["actions"])
        assert np.abs(eb["actions"][:, :3]).max() <= 0.6 * np.abs(ea["actions"][:, :3]).max() + 1e-4
    assert json.loads((tmp_path / "manifest.json").read_text())["generator"]["oracle_speed"] == [0.6, 0.6]
    r = _generate(tmp_path, "TASKS=PlaceNextTo", "EPISODES=3", check=False)  # the default speed, same OUT
    assert r.returncode == 2 and "oracle_speed=[0.6, 0.6]" in r.stderr


def test_oracle_travel_height_raises_the_descents_not_the_scenes_or_the_code(dataset, tmp_path):
    """oracle_travel_height=[lo,hi]: each seed's oracle travels (and starts its pick) at least that
    high; the scene and the code program are the seed's; a folder keeps one setting."""
    r = _generate(tmp_path, "TASKS=PlaceNextTo", "EPISODES=2", "oracle_travel_height=[0.16,0.16]")
    assert r.returncode == 0
    pick_z = lambda e: [e["obs/tcp_pose"][t, 2] for t, (c, k) in enumerate(
        zip(e["labels/oracle/code"][:], e["labels/oracle/key_step"][:])) if k and c.startswith(b"pick")][0]
    for ea, eb in _varied_episodes(dataset, tmp_path):
        assert pick_z(ea) == pytest.approx(0.12, abs=0.01)
        assert pick_z(eb) == pytest.approx(0.16, abs=0.01)
    assert json.loads((tmp_path / "manifest.json").read_text())["generator"]["oracle_travel_height"] == [0.16, 0.16]
    r = _generate(tmp_path, "TASKS=PlaceNextTo", "EPISODES=3", check=False)  # as scripted, same OUT
    assert r.returncode == 2 and "oracle_travel_height=[0.16, 0.16]" in r.stderr


def test_foreign_files_are_rejected(tmp_path):
    bad = tmp_path / "x.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(schema.SchemaError, match="not a code2action-oracle file"):
        schema.open_index(bad)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(schema.SchemaError, match="not a readable HDF5 file"):
        schema.open_index(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "v0.h5", "w") as f:
        f.attrs.update(format=schema.FORMAT, version=0)
    with pytest.raises(schema.SchemaError, match="version 0"):
        schema.open_index(tmp_path / "v0.h5")


def _limit_file_size(limit: int):
    """For a child process: files larger than ``limit`` bytes fail with EFBIG (as on a full disk)."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_episode_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    """The disk fills up in the middle of an episode file (ENOSPC from the HDF5 writer, after a
    few datasets): the write raises OSError and leaves neither the episode nor its temporary file."""
    import errno

    from datamodules import generate

    calls = {"n": 0}
    create = h5py.Group.create_dataset

    def create_until_full(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return create(self, *args, **kwargs)

    generate._init_worker({"image_size": 32, "backend": "cpu"}, str(tmp_path))
    try:
        generate._worker_env("Topple")
        monkeypatch.setattr(h5py.Group, "create_dataset", create_until_full)
        with pytest.raises(OSError, match="No space left"):
            generate.solve_and_write("Topple", 0)
    finally:
        for env in generate._WORKER_ENVS.values():
            env.close()
        generate._WORKER_ENVS.clear()
    assert calls["n"] > 3
    assert not list(tmp_path.rglob("seed_*"))


def test_a_full_disk_stops_make_data_with_one_error_and_keeps_nothing_half_written(tmp_path):
    cmd = [sys.executable, str(SCRIPT), f"OUT={tmp_path}", "env.image_size=32", "TASKS=Topple", "EPISODES=2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       preexec_fn=_limit_file_size(20_000))  # an episode file is larger than 20 kB
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Topple seed" in lines[0], r.stderr[-3000:]
    assert "rerun the same command" in lines[0]
    folder = tmp_path / "Topple"
    assert not list(folder.glob("seed_*.h5"))  # nothing half-written under an episode's name
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    _generate(tmp_path, "TASKS=Topple", "EPISODES=2")  # with room again, the same command completes
    with schema.open_index(tmp_path / "Topple.h5") as f:
        assert list(f["episodes"]) == [schema.episode_name(0), schema.episode_name(1)]


@pytest.mark.slow  # once, with two trainings on the 2 cores, the run finished with exit 0 (the interrupt was lost)
def test_ctrl_c_is_one_error_line_exit_130_and_the_same_command_resumes(tmp_path):
    cmd = [sys.executable, str(SCRIPT), f"OUT={tmp_path}", "env.image_size=32", "TASKS=Topple", "EPISODES=5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    folder = tmp_path / "Topple"
    deadline = time.time() + 300
    while time.time() < deadline and not (folder.is_dir() and list(folder.glob("seed_*.h5"))):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    _generate(tmp_path, "TASKS=Topple", "EPISODES=5")
    with schema.open_index(tmp_path / "Topple.h5") as f:
        assert len(f["episodes"]) == 5
