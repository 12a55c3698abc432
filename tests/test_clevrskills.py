"""ClevrSkills import (`make import-clevrskills`) and LLaVA export (`make export-llava`) on the two
real ClevrSkills trajectories of tests/clevrskills_sample/ (a copy of ../shared/clevrskills_sample:
PlaceNextTo traj_44, Push traj_45, and ClevrSkills' own LLaVA conversion of them)."""

import bz2
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
import torch

from datamodules.check import check_dataset, check_episode
from datamodules.clevrskills.labels import LabelMappingError, fine_labels, place_lines
from datamodules.clevrskills.source import ClevrSkillsFormatError, clevrskills_task, find_trajectories
from datamodules.dataset import OracleStepDataset, dataset_files, resolve_dataset_tasks
from datamodules.grounding import NOT_VISIBLE, grid_cell, vqa_samples
from datamodules.labels import extract_memory_info, is_key_step
from envs.skills.interpreter import Interpreter

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "clevrskills_sample"
TRAJ = {"place_next_to/traj_44": "PlaceNextTo", "push/traj_45": "PushToTarget"}
sys.path.insert(0, str(ROOT / "scripts"))


def run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def entry(main, argv, capsys) -> tuple[int, str, str]:
    from configs import entry_status

    rc = entry_status(main, argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def import_sample(src, out, *args) -> dict:
    r = run("import_clevrskills.py", f"SRC={src}", f"OUT={out}", "progress=false", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((Path(out) / "manifest.json").read_text())


def decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def episode(out, rel):
    """The episode group imported from the trajectory ``rel`` (file kept open by the caller's ``with``)."""
    task = TRAJ[rel]
    f = h5py.File(Path(out) / f"{task}.h5", "r")
    for name in f["episodes"]:
        if f["episodes"][name].attrs["source_path"].endswith(rel):
            return f, f["episodes"][name]
    raise AssertionError(f"{rel} not imported")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The sample imported at 64 px (fine labels)."""
    out = tmp_path_factory.mktemp("cs") / "data"
    manifest = import_sample(SAMPLE, out, "image_size=64")
    return out, manifest


@pytest.fixture(scope="module")
def doubled(tmp_path_factory):
    """Two copies of the sample (a/, b/): two episodes per task, so the VLM has validation episodes."""
    src = tmp_path_factory.mktemp("cs2") / "src"
    for copy in ("a", "b"):
        for rel in TRAJ:
            shutil.copytree(SAMPLE / rel, src / copy / rel)
    out = src.parent / "data"
    import_sample(src, out, "image_size=64", "WORKERS=2")
    return src, out


# ---------------------------------------------------------------------------- import: arrays
def test_both_trajectories_import_with_the_source_arrays(imported):
    out, manifest = imported
    assert manifest["imported"] == 2 and manifest["skipped"] == 0
    assert sorted(manifest["tasks"]) == ["PlaceNextTo", "PushToTarget"]
    for rel in TRAJ:
        src = SAMPLE / rel
        actions = np.load(src / "actions.npy")
        T = len(actions)
        f, g = episode(out, rel)
        with f:
            assert g.attrs["num_steps"] == T == len(g["actions"]) == len(g["success"])
            np.testing.assert_array_equal(g["actions"][:], actions.astype(np.float32))  # float32, as our schema
            np.testing.assert_array_equal(g["obs/qpos"][:], np.load(src / "agent/qpos.npy")[:T])
            np.testing.assert_array_equal(g["obs/qvel"][:], np.load(src / "agent/qvel.npy")[:T])
            np.testing.assert_array_equal(g["obs/tcp_pose"][:], np.load(src / "agent/ee_pose.npy")[:T])
            suction = np.stack([np.load(src / f"agent/vacuum_{k}.npy")[:T] for k in ("on", "grasping")], 1)
            np.testing.assert_array_equal(g["obs/suction"][:], suction.astype(np.float32))
            np.testing.assert_array_equal(g["success"][:], np.load(src / "success.npy"))
            assert g.attrs["robot"] == "xarm6_vacuum" and g.attrs["qpos_dim"] == 11 and g.attrs["arm_joints"] == 6
            assert g.attrs["proprio_dim"] == 29 and g.attrs["source_seed"] == int(rel.split("_")[-1])
            # objects: "<texture> <shape>" names in id order, ids apart, poses from extra/actors.npy
            names = list(g["objects/name"].asstr()[:])
            files = sorted((src / "extra/actor_mesh_bbox/base_camera").glob("*.npy"),
                           key=lambda p: int(p.stem.split("_")[-1]))
            assert names == [p.stem.rsplit("_", 1)[0] for p in files]
            assert list(g["objects/id"][:]) == [int(p.stem.rsplit("_", 1)[1]) for p in files]
            assert list(g["objects/shape"].asstr()[:]) == [n.split()[-1] for n in names]
            states = np.load(src / "extra/actors.npy")[:T].reshape(T, len(names), 13)
            np.testing.assert_array_equal(g["obs/object_pose"][:], states[..., :7])
            assert np.all(g["objects/height"][:] > 0.01) and np.all(g["objects/radius"][:] > 0.005)
            # boxes: the source boxes scaled 256 -> 64 px
            for i, p in enumerate(files):
                box = np.load(p)[:T, :, :2].reshape(T, 4) * 64 / 256
                np.testing.assert_allclose(g["obs/bboxes"][:, i], np.clip(box, 0, 64), atol=1e-4)


def test_images_are_the_decoded_video_frames(tmp_path):
    out = tmp_path / "native"
    import_sample(SAMPLE, out, "image_size=256")
    for rel in TRAJ:
        f, g = episode(out, rel)
        with f:
            T = g.attrs["num_steps"]
            for key, camera in (("base_rgb", "base_camera"), ("wrist_rgb", "hand_camera")):
                frames = decode(SAMPLE / rel / "image" / camera / "rgb.mp4")
                assert len(frames) == T + 1  # the last observation comes after the last action
                np.testing.assert_array_equal(g[f"obs/{key}"][:], frames[:T])
    # the ffmpeg executable of imageio-ffmpeg (another decoding path) agrees up to YUV->RGB rounding
    import imageio.v2 as iio2

    with h5py.File(out / "PlaceNextTo.h5", "r") as f:
        stored = f["episodes"][list(f["episodes"])[0]]["obs/base_rgb"][:]
    with iio2.get_reader(SAMPLE / "place_next_to/traj_44/image/base_camera/rgb.mp4", format="FFMPEG") as reader:
        other = np.stack([frame for frame in reader])
    assert len(other) == len(stored) + 1
    assert np.abs(other[:len(stored)].astype(int) - stored).mean() < 1.0


def test_resized_images_follow_the_frames(imported):
    out, _ = imported
    rel = "push/traj_45"
    frames = decode(SAMPLE / rel / "image/base_camera/rgb.mp4").astype(np.float64)
    f, g = episode(out, rel)
    with f:
        small = g["obs/base_rgb"][:].astype(np.float64)
    T = len(small)
    block_mean = frames[:T].reshape(T, 64, 4, 64, 4, 3).mean((2, 4))  # 4x4 box filter
    assert small.shape == (T, 64, 64, 3)
    assert np.abs(small - block_mean).mean() < 3.0


# ---------------------------------------------------------------------------- import: labels
def test_fine_labels_are_our_api_and_parse(imported):
    out, _ = imported
    parser = Interpreter(api=None)
    expected = {
        "place_next_to/traj_44": [
            "pose_dict['target'] = free_space_next_to(get_actor('yellow swirl triangle'), "
            "get_actor('purple paisley cylinder'), direction='left')",
            "move3d(get_actor('yellow swirl triangle'))",
            "pick(get_actor('yellow swirl triangle'))",
            "move3d(pose_dict['target'])",
            "place(get_actor('yellow swirl triangle'), pose_dict['target'])",
            "done()"],
        "push/traj_45": [
            "move3d(get_actor('red purple stripe cylinder'))",
            "push(get_actor('red purple stripe cylinder'), towards=get_actor('dark red swirl cylinder'))",
            "done()"]}
    for rel, lines in expected.items():
        f, g = episode(out, rel)
        with f:
            code = list(g["labels/oracle/code"].asstr()[:])
            keys = list(g["labels/oracle/key_step"][:])
            assert [c for c, k in zip(code, keys) if k] == lines
            for c, k in zip(code, keys):
                assert k == is_key_step(c)
                parser.parse(c if k else c[2:])  # every line, key-step or commented, is API code
            # key-steps: the first step of each leaf solver instance (one line per step)
            trace = pickle.load(bz2.open(SAMPLE / rel / "action_trace.pickle.bz2"))
            leaf_starts = [t for t in range(1, len(trace))
                           if trace[t][-1]["solver_random_id"] != trace[t - 1][-1]["solver_random_id"]]
            if rel.startswith("place"):
                assert [t for t, k in enumerate(keys) if k] == [0, 1, 21, 33, 52, 53]
                assert leaf_starts[:3] == [21, 33, 52]
                pose = dict(zip(g["labels/oracle/pose_keys"].asstr()[:], g["labels/oracle/pose_values"][:]))
                np.testing.assert_allclose(pose["target"], trace[0][1]["target_pose"][0], atol=1e-6)
            else:  # the back-off Move3dSolver at 53 continues the push; the root's own step 54 is done()
                assert [t for t, k in enumerate(keys) if k] == [0, 29, 54]
                assert leaf_starts == [29, 53, 54]
    counts, problems = check_dataset(out, parse_labels=True, decode_images=True)
    assert problems == [] and sum(counts.values()) == 2


def test_coarse_labels_equal_clevrskills_own_llava_answers(imported):
    out, _ = imported
    conversations = json.loads((SAMPLE / "llava_dataset_sample.json").read_text())
    for rel in TRAJ:
        answers = [c["conversations"][1]["value"] for c in conversations if c["source"] == rel]
        lines = [line for answer in dict.fromkeys(answers) for line in answer.split("\n")]
        f, g = episode(out, rel)
        with f:
            lab = g["labels/clevrskills_coarse"]
            coarse = [c for c, k in zip(lab["code"].asstr()[:], lab["key_step"][:]) if k]
            assert lab.attrs["notation"] == "clevrskills-llava"
        assert coarse == lines and lines[-1] == "done()", rel


def test_coarse_level_as_the_main_labels(tmp_path):
    out = tmp_path / "coarse"
    import_sample(SAMPLE, out, "image_size=32", "LEVEL=coarse")
    f, g = episode(out, "place_next_to/traj_44")
    with f:
        main = [c for c, k in zip(g["labels/oracle/code"].asstr()[:], g["labels/oracle/key_step"][:]) if k]
        lab = g["labels/clevrskills_fine"]
        fine = [c for c, k in zip(lab["code"].asstr()[:], lab["key_step"][:]) if k]
        assert main[1] == "pick_move3d_place(actor=get_actor('yellow swirl triangle'), target_pose=target_pose)"
        assert fine[-2:] == ["place(get_actor('yellow swirl triangle'), pose_dict['target'])", "done()"]
    # the coarse notation is not our API: check-data parses only the fine set, and it is sound
    assert check_dataset(out)[1] == []


def test_oracle_step_dataset_reads_the_import(imported):
    out, _ = imported
    files = dataset_files(out, ["PlaceNextTo", "PushToTarget"])  # with the quick check of every file
    ds = OracleStepDataset(files, horizon=16, load_state=True, chunk_end="line")
    assert len(ds) == 54 + 55
    s = ds[2]
    assert s["proprio"].shape == (29,) and s["suction"].shape == (2,) and s["actions"].shape == (16, 7)
    assert s["base_rgb"].shape == (3, 64, 64) and s["base_rgb"].dtype == torch.uint8
    assert s["prompt"] == "Pick and place the yellow swirl triangle left of the purple paisley cylinder"
    # the cache info (ExtractMemoryInfo) holds the stored target from step 1 on
    assert s["cache_info"].startswith("pose_dict['target'] = free_space_next_to(")
    assert s["cache_info"] == extract_memory_info(s["memory"].split("\n"))
    assert s["object_names"] == "purple paisley cylinder\nyellow swirl triangle" and s["pose_keys"] == "target"
    push = ds[54 + 30]
    assert push["task"] == "PushToTarget" and push["cache_info"] == "None"
    assert push["instruction"].startswith("# push(get_actor('red purple stripe cylinder')")


# ---------------------------------------------------------------------------- import: failures
def _trace_with(path: Path, old: str, new: str) -> None:
    trace = pickle.load(bz2.open(path))
    for stack in trace:
        for s in stack:
            if s["solver_class"] == old:
                s["solver_class"] = new
    with bz2.open(path, "wb") as f:
        pickle.dump(trace, f)


def test_bad_trajectories_are_recorded_skips(tmp_path, capsys):
    import import_clevrskills

    src = tmp_path / "src"
    shutil.copytree(SAMPLE / "place_next_to/traj_44", src / "ok/traj_44")
    shutil.copytree(SAMPLE / "place_next_to/traj_44", src / "truncated/traj_44")
    video = src / "truncated/traj_44/image/base_camera/rgb.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    shutil.copytree(SAMPLE / "push/traj_45", src / "no_trace/traj_45")
    (src / "no_trace/traj_45/action_trace.pickle.bz2").unlink()
    shutil.copytree(SAMPLE / "push/traj_45", src / "unknown/traj_45")
    _trace_with(src / "unknown/traj_45/action_trace.pickle.bz2", "PushAlongPathSolver", "LevitateSolver")
    out = tmp_path / "out"
    rc, stdout, err = entry(import_clevrskills.main, [f"SRC={src}", f"OUT={out}", "image_size=32", "progress=false"],
                            capsys)
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["imported"] == 1 and manifest["skipped"] == 3
    reasons = manifest["skipped_trajectories"]
    assert "rgb.mp4" in reasons["truncated/traj_44"] and ("truncated" in reasons["truncated/traj_44"]
                                                          or "does not decode" in reasons["truncated/traj_44"])
    assert reasons["no_trace/traj_45"] == "missing action_trace.pickle.bz2"
    assert "LevitateSolver has no fine mapping" in reasons["unknown/traj_45"]
    assert "3 skipped" in stdout
    # nothing half-written: one episode file, sound, no temporary files
    episodes = sorted(out.glob("*/seed_*.h5"))
    assert len(episodes) == 1 and check_episode(episodes[0]) is None
    assert not list(out.rglob("*.tmp"))
    # a rerun keeps the skips (markers) and the episode, and reports the same
    before = episodes[0].read_bytes()
    rc, _, _ = entry(import_clevrskills.main, [f"SRC={src}", f"OUT={out}", "image_size=32", "progress=false"], capsys)
    assert rc == 0 and json.loads((out / "manifest.json").read_text()) == manifest
    assert episodes[0].read_bytes() == before


def test_not_clevrskills_data_is_one_error(imported, tmp_path, capsys):
    import import_clevrskills

    out, _ = imported
    for argv in ([f"SRC={out}"],                 # one of our datasets
                 [f"SRC={ROOT / 'configs'}"],     # any other folder
                 [f"SRC={tmp_path}/nonexistent"], ["LEVEL=medium", f"SRC={SAMPLE}"], ["image_size=-3", f"SRC={SAMPLE}"],
                 []):
        rc, _, err = entry(import_clevrskills.main, [*argv, f"OUT={tmp_path}/o", "progress=false"], capsys)
        assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (argv, err)
    assert "no ClevrSkills trajectory folders" in entry(import_clevrskills.main, [f"SRC={out}", f"OUT={tmp_path}/o"],
                                                        capsys)[2]
    with pytest.raises(ClevrSkillsFormatError):
        find_trajectories(ROOT / "configs")
    # a dataset of `make data` is never written into
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "manifest.json").write_text(json.dumps({"format": "code2action-oracle", "generator": {}, "tasks": {}}))
    rc, _, err = entry(import_clevrskills.main, [f"SRC={SAMPLE}", f"OUT={ours}"], capsys)
    assert rc == 2 and "make data" in err and sorted(p.name for p in ours.iterdir()) == ["manifest.json"]
    # an output folder of another import (other settings) is refused, and left as it was
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*"))
    rc, _, err = entry(import_clevrskills.main, [f"SRC={SAMPLE}", f"OUT={out}", "image_size=32"], capsys)
    assert rc == 2 and "holds an import" in err and sorted(p.stat().st_mtime_ns for p in out.rglob("*")) == before
    # the command line: one error line and exit 2
    r = run("import_clevrskills.py", f"SRC={ROOT / 'configs'}", f"OUT={tmp_path}/o")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def _arrays(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.glob("*/seed_*.h5")):
        with h5py.File(path, "r") as f:
            def visit(name, obj, path=path):
                if isinstance(obj, h5py.Dataset):
                    out[(path.relative_to(folder).as_posix(), name)] = obj[()].tobytes() if obj.dtype.kind != "O" \
                        else tuple(obj.asstr()[()].tolist()) if obj.shape else obj.asstr()[()]
            f.visititems(visit)
            attrs = f["episode"].attrs
            out[(path.relative_to(folder).as_posix(), "attrs")] = sorted((k, str(v)) for k, v in attrs.items())
    return out


def test_killed_import_reruns_to_the_same_result(tmp_path):
    src = tmp_path / "src"
    for copy in ("a", "b", "c"):
        for rel in TRAJ:
            shutil.copytree(SAMPLE / rel, src / copy / rel)
    args = [f"SRC={src}", "image_size=48", "progress=false"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/import_clevrskills.py"), *args, f"OUT={killed}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(killed.glob("*/seed_*.h5")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = list(killed.glob("*/seed_*.h5"))
    assert all(check_episode(p) is None for p in written)  # whatever was written is whole
    assert len(written) < 6, "the import finished before the kill: the test did not test a kill"
    # a kill in the middle of a write leaves a temporary file, never a seed_*.h5
    (killed / "PlaceNextTo").mkdir(exist_ok=True)
    (killed / "PlaceNextTo" / "seed_0000004.h5abc.tmp").write_bytes(b"half")
    resumed = import_sample(src, killed, *args[1:])
    clean = import_sample(src, tmp_path / "clean", *args[1:])
    assert resumed == clean and resumed["imported"] == 6
    assert _arrays(killed) == _arrays(tmp_path / "clean")
    for task in ("PlaceNextTo", "PushToTarget"):
        assert (killed / f"{task}.stats.json").read_text() == (tmp_path / "clean" / f"{task}.stats.json").read_text()
        with h5py.File(killed / f"{task}.h5", "r") as a, h5py.File(tmp_path / "clean" / f"{task}.h5", "r") as b:
            assert list(a["episodes"]) == list(b["episodes"])


# ---------------------------------------------------------------------------- training and relabelling on it
def test_train_dp_runs_20_steps_on_the_import(imported, tmp_path):
    out, _ = imported
    run_dir = tmp_path / "dp"
    r = run("train_dp.py", f"DATA={out}", "DATASET=PlaceNextTo,PushToTarget", f"OUT={run_dir}", "trainer.max_steps=20",
            "data.num_workers=0", "data.batch_size=8", "trainer.val_check_interval=10", "val_sample_batches=1",
            "trainer.enable_progress_bar=false")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 20
    from policies.diffusion_policy import DiffusionPolicy

    policy = DiffusionPolicy.from_checkpoint(run_dir / "policy.pt")
    assert policy.model.proprio_dim == 29  # read from the data (xArm6: 11 + 11 + 7), not the Panda's 21
    ds = OracleStepDataset(dataset_files(out, ["PlaceNextTo"]), load_state=True)
    batch = torch.utils.data.default_collate([ds[0], ds[30]])
    chunk = policy.model.sample(batch, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (2, 16, 7) and torch.isfinite(chunk).all()


def test_train_vlm_20_steps_and_relabel_on_the_import(doubled, tmp_path, capsys):
    import relabel_dp
    import train_vlm

    _, data = doubled
    run_dir = tmp_path / "vlm"
    argv = [f"DATA={data}", "DATASET=PlaceNextTo,PushToTarget", f"OUT={run_dir}", "STEPS=20", "model.image_size=32",
            "model.text.num_hidden_layers=2", "model.text.hidden_size=96", "model.text.num_attention_heads=4",
            "trainer.enable_progress_bar=false", "data.val_fraction=0.5", "trainer.val_check_interval=10",
            "data.batch_size=8", "data.val_max_items=32", "inference.max_new_tokens=12"]
    rc, stdout, err = entry(train_vlm.main, argv, capsys)
    assert rc == 0, err
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 20
    assert (run_dir / "export" / "vlm.json").exists() and "validation: {" in stdout
    rc, stdout, err = entry(relabel_dp.main, [f"DATA={data}", "DATASET=PlaceNextTo,PushToTarget",
                                              f"VLM={run_dir}/export", "progress=false"], capsys)
    assert rc == 0, err
    files = dataset_files(data, ["PlaceNextTo", "PushToTarget"])
    assert [e.length for e in OracleStepDataset(files, label_set="vlm", load_images=False).episodes] == [54, 54, 55, 55]


# ---------------------------------------------------------------------------- grounding sentinel, tasks, model width
def test_objects_out_of_view_get_the_sentinel_and_no_grounding_question(imported, tmp_path):
    out, _ = imported
    src = tmp_path / "src"
    shutil.copytree(SAMPLE / "push/traj_45", src / "push/traj_45")
    vis = src / "push/traj_45/extra/actor_is_visible/base_camera/dark red swirl cylinder_21.npy"
    flags = np.load(vis)
    flags[10:20] = 0
    np.save(vis, flags)
    data = tmp_path / "data"
    import_sample(src, data, "image_size=32")
    with h5py.File(data / "PushToTarget" / "seed_0000000.h5", "r") as f:
        g = f["episode"]
        boxes, names = g["obs/bboxes"][:], list(g["objects/name"].asstr()[:])
    i = names.index("dark red swirl cylinder")
    assert np.all(boxes[10:20, i] == NOT_VISIBLE) and np.all(boxes[:10, i] >= 0) and np.all(boxes[10:20, 1 - i] >= 0)
    qa = vqa_samples(names, boxes[12], 32, np.random.default_rng(0))
    assert qa and not any("dark red swirl" in q for q, _ in qa)
    assert vqa_samples(names, np.full((2, 4), NOT_VISIBLE), 32, np.random.default_rng(0)) == []
    # a frame with no visible object gives its code sample instead of a grounding one
    from datamodules.vqa import BBOX, CODE, VQADataset

    with h5py.File(data / "PushToTarget" / "seed_0000000.h5", "r+") as f:
        f["episode/obs/bboxes"][...] = NOT_VISIBLE
    ds = VQADataset([data / "PushToTarget.h5"], code_fraction=0.5, seed=0)
    items = [k for k, it in enumerate(ds.items) if it.kind == BBOX]
    assert items and all(ds[k]["kind"] == CODE and "Task: " in ds[k]["question"] for k in items[:5])


def test_task_names_and_dataset_tasks(imported, tmp_path):
    out, _ = imported
    assert clevrskills_task(["Push {obj:a cube_3} towards {obj:b cube_4}"]) == "Push"
    assert clevrskills_task(["Touch and topple {obj:a cube_3}"]) == "Touch"
    assert clevrskills_task(["Stack {obj:a_1} on {obj:b_2} and then topple the stack"]) == "SingleStackTopple"
    assert clevrskills_task(["Do a dance"]) is None
    # a task our suite lacks keeps its name and trains from its index file
    touch = tmp_path / "touch"
    import_sample(SAMPLE, touch, "image_size=32", "TASK=Touch")
    assert resolve_dataset_tasks("Touch", touch) == ["Touch"]
    assert resolve_dataset_tasks("PlaceNextTo,PushToTarget", out) == ["PlaceNextTo", "PushToTarget"]
    from envs import UnknownTaskError

    with pytest.raises(UnknownTaskError, match="Juggle"):
        resolve_dataset_tasks("Juggle", touch)


def test_label_placement_and_mapping_errors():
    lines, key = place_lines([(0, ["a", "b"]), (2, ["c"]), (2, ["d"])], 5)
    assert lines == ["a", "b", "c", "d", "d"] and key == [True, True, True, True, False]
    with pytest.raises(LabelMappingError, match="do not fit"):
        place_lines([(0, ["a", "b", "c"])], 2)
    root = {"solver_class": "Solver", "solver_python_id": 1, "solver_random_id": 1}
    throw = {"solver_class": "ThrowSolver", "solver_python_id": 2, "solver_random_id": 2, "action_emitted": True}
    with pytest.raises(LabelMappingError, match="ThrowSolver"):
        fine_labels([[root, throw]] * 3, [False, False, True])


def test_dp_model_proprio_width_and_old_checkpoints():
    from lightning_modules.dp.model import DiffusionPolicyModel

    kw = dict(observation="rgb", image_size=32, resnet_width=8, image_pool="avg", unet_channels=(16, 32, 64),
              conditioning="none", d_model=32)
    old = DiffusionPolicyModel(**kw)  # a checkpoint's config from before proprio_dim
    assert old.proprio.in_features == 21 and old.tcp_position == slice(14, 17)
    new = DiffusionPolicyModel(**kw, proprio_dim=29)
    assert new.proprio.in_features == 29 and new.tcp_position == slice(22, 25)
    DiffusionPolicyModel(**kw).load_state_dict(old.state_dict())  # still loads
    with pytest.raises(RuntimeError):
        new.load_state_dict(old.state_dict())


# ---------------------------------------------------------------------------- LLaVA export
def test_export_llava_from_the_import(imported, tmp_path, capsys):
    import export_llava

    out, _ = imported
    dst = tmp_path / "llava"
    rc, stdout, err = entry(export_llava.main, [f"DATA={out}", f"OUT={dst}"], capsys)
    assert rc == 0, err
    samples = json.loads((dst / "llava.json").read_text())
    assert len({s["id"] for s in samples}) == len(samples)
    code = [s for s in samples if not s["object_conversation"]]
    ground = [s for s in samples if s["object_conversation"]]
    assert len(code) == 6 + 3 and ground
    import imageio.v3 as iio

    for s in samples:
        human, gpt = s["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and human["value"].count("<image>") == 1
        task, seed, t = s["image"].split("/")[1], s["image"].split("_")[-2], int(s["image"].split("_t")[-1][:4])
        with h5py.File(out / task / f"seed_{seed}.h5", "r") as f:
            g = f["episode"]
            np.testing.assert_array_equal(iio.imread(dst / s["image"]), g["obs/base_rgb"][t])
            labels = list(g["labels/oracle/code"].asstr()[:])
            if not s["object_conversation"]:  # our prompt format, with the key-step request
                assert human["value"].startswith(f"Task: {g.attrs['prompt']}\nMemory:\n")
                assert human["value"].endswith("<image>\nPlease give a keystep reply") and gpt["value"] == labels[t]
            elif human["value"].startswith("Where is the "):
                name = human["value"][len("Where is the "):].split("?")[0]
                i = list(g["objects/name"].asstr()[:]).index(name)
                assert gpt["value"] == "({}, {})".format(*grid_cell(g["obs/bboxes"][t, i], 64))
    first = [s["conversations"][1]["value"] for s in code if s["source"] == "PlaceNextTo/seed_0000000"]
    assert first[0].startswith("pose_dict['target'] =") and first[-1] == "done()"
    # the coarse label set, every frame, no grounding
    rc, _, err = entry(export_llava.main, [f"DATA={out}", f"OUT={tmp_path}/coarse", "LABELS=clevrskills_coarse",
                                           "grounding=0", "frames=all", "keystep_request=false"], capsys)
    assert rc == 0, err
    samples = json.loads((tmp_path / "coarse" / "llava.json").read_text())
    assert len(samples) == 54 + 55
    f, g = episode(out, "place_next_to/traj_44")
    with f:
        lab = g["labels/clevrskills_coarse"]
        coarse = [c for c, k in zip(lab["code"].asstr()[:], lab["key_step"][:]) if k]
    answers = [s["conversations"][1]["value"] for s in samples if s["source"] == "PlaceNextTo/seed_0000000"]
    assert [a for a in answers if is_key_step(a)] == coarse and answers[2] == "# " + coarse[1]
    for argv in ([f"DATA={tmp_path}/none"], [f"DATA={out}", "LABELS=nope"], [f"DATA={out}", "frames=some"]):
        rc, _, err = entry(export_llava.main, [*argv, f"OUT={tmp_path}/x"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (argv, err)


@pytest.mark.slow
def test_export_llava_from_generated_data(oracle_data, tmp_path, capsys):
    import export_llava

    data = oracle_data(["Push"], 1, 32)
    rc, _, err = entry(export_llava.main, [f"DATA={data}", f"OUT={tmp_path}/llava", "TASKS=Push"], capsys)
    assert rc == 0, err
    samples = json.loads((tmp_path / "llava" / "llava.json").read_text())
    code = [s["conversations"][1]["value"] for s in samples if not s["object_conversation"]]
    with h5py.File(Path(data) / "Push.h5", "r") as f:
        g = f["episodes/seed_0000000"]
        keys = [c for c, k in zip(g["labels/oracle/code"].asstr()[:], g["labels/oracle/key_step"][:]) if k]
    assert code == keys
