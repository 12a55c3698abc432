"""Shifted labels, grounding VQA, normalisation statistics and the step dataset on real files."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.dataset import OracleStepDataset, dataset_files
from datamodules.grounding import grid_cell, vqa_samples
from datamodules.labels import is_key_step, shift_boundaries, shifted_labels, step_labels
from datamodules.stats import load_stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_data.py"), f"OUT={out}",
                        "TASKS=PlaceNextTo,Swap", "EPISODES=2", "env.image_size=32"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


# ------------------------------------------------------------------ shifted-oracle labels
TRACE = step_labels(["a()"] * 5 + ["b()"] * 6 + ["c()"] * 4 + ["d()"] * 3,
                    [True, 0, 0, 0, 0, True, 0, 0, 0, 0, 0, True, 0, 0, 0, True, 0, 0])


def test_shift_moves_boundaries_within_k_and_keeps_order():
    flags = [is_key_step(x) for x in TRACE]
    starts = [t for t, f in enumerate(flags) if f]
    seen = set()
    for seed in range(200):
        new = shift_boundaries(flags, 2, np.random.default_rng(seed))
        new_starts = [t for t, f in enumerate(new) if f]
        assert len(new_starts) == len(starts) and new_starts[0] == 0
        assert all(b > a for a, b in zip(new_starts, new_starts[1:]))
        assert all(abs(n - o) <= 2 for n, o in zip(new_starts, starts))
        seen.add(tuple(new_starts))
    assert len(seen) > 20  # it does shift


def test_shifted_labels_are_deterministic_and_well_formed():
    a = shifted_labels(TRACE, 3, np.random.default_rng(7))
    b = shifted_labels(TRACE, 3, np.random.default_rng(7))
    assert a == b and len(a) == len(TRACE)
    keys = [x for x in a if is_key_step(x)]
    assert keys == ["a()", "b()", "c()", "d()"]
    for prev, cur in zip(a, a[1:]):
        if not is_key_step(cur):
            assert cur == "# " + prev.removeprefix("# ")
    assert shifted_labels(TRACE, 0, np.random.default_rng(0)) == TRACE


# ------------------------------------------------------------------ grounding VQA
def test_grid_cells_and_vqa():
    assert grid_cell([0, 0, 12, 12], 128) == (0, 0)
    assert grid_cell([120, 60, 128, 70], 128) == (9, 5)
    assert grid_cell([60, 120, 70, 128], 128, n=4) == (2, 3)
    boxes = np.array([[10, 10, 20, 20], [100, 100, 120, 120]], dtype=float)
    qa = vqa_samples(["red cube", "blue cylinder"], boxes, 128, np.random.default_rng(0), negatives=2)
    assert ("Where is the red cube?", "(1, 1)") in qa
    assert ("Is there a blue cylinder at (8, 8)?", "yes") in qa
    negatives = [(q, a) for q, a in qa if a == "no"]
    assert len(negatives) == 4
    assert all("(1, 1)" not in q for q, a in negatives if "red cube" in q)


# ------------------------------------------------------------------ dataset
def test_dataset_samples_have_documented_shapes(data):
    files = dataset_files(data, ["PlaceNextTo", "Swap"])
    ds = OracleStepDataset(files, horizon=16)
    assert len(ds) == sum(e.length for e in ds.episodes)
    s = ds[0]
    assert s["base_rgb"].shape == (3, 32, 32) and s["base_rgb"].dtype == torch.uint8
    assert s["proprio"].shape == (21,) and s["suction"].shape == (2,)
    assert s["actions"].shape == (16, 7) and s["action_mask"].all()
    assert s["key_step"] and s["memory"] == "" and s["cache_info"] == "None"
    assert s["instruction"].startswith("pose_dict['target'] = free_space_next_to(")
    # an assignment holds one step; then the move starts with the assignment in memory
    s1, s2 = ds[1], ds[2]
    assert s1["instruction"].startswith("move3d(") and s1["key_step"]
    assert s1["cache_info"] == s["instruction"] == s1["memory"]
    assert s2["instruction"] == "# " + s1["instruction"] and not s2["key_step"]
    assert s2["memory"] == s["instruction"] + "\n" + s1["instruction"]
    assert s2["cache_info"] == s["instruction"]


def test_samples_hold_the_files_arrays_and_do_not_alias_the_cache(data):
    """Low-dim arrays are read once per episode and kept: samples still equal the HDF5 contents
    step for step, and changing a sample changes no later one."""
    import h5py

    files = dataset_files(data, ["PlaceNextTo"])
    ds = OracleStepDataset(files, horizon=4, load_state=True, load_images=False)
    ep = ds.episodes[0]
    with h5py.File(files[0]) as f:
        g = f["episodes"][ep.name]
        for t in (0, 3, ep.length - 1):
            s = ds[t]
            expect = np.concatenate([g["obs/qpos"][t], g["obs/qvel"][t], g["obs/tcp_pose"][t]])
            np.testing.assert_array_equal(s["proprio"].numpy(), expect)
            np.testing.assert_array_equal(s["suction"].numpy(), g["obs/suction"][t])
            np.testing.assert_array_equal(s["actions"][0].numpy(), g["actions"][t])
            n = len(ep.objects)
            np.testing.assert_array_equal(s["object_pose"][:n].numpy(), g["obs/object_pose"][t])
    first = ds[2]
    for key in ("proprio", "suction", "actions", "object_pose"):
        first[key].fill_(123.0)
    again = ds[2]
    assert not any(bool((again[key] == 123.0).any()) for key in ("proprio", "suction", "actions", "object_pose"))


def test_action_chunks_pad_with_the_last_action(data):
    ds = OracleStepDataset(dataset_files(data, ["PlaceNextTo"]), horizon=16)
    ep = ds.episodes[0]
    last = ds[ep.length - 1]
    assert last["action_mask"].sum() == 1
    assert torch.equal(last["actions"][0], last["actions"][-1])
    mid = ds[ep.length - 5]
    assert mid["action_mask"].sum() == 5
    assert torch.equal(mid["actions"][4], mid["actions"][10])


def test_line_chunks_stop_at_the_next_key_step_and_hold(data):
    """chunk_end="line": the recorded actions up to the line's end, then holds (no motion, the
    line's last suction command); the episode-end rule is unchanged."""
    files = dataset_files(data, ["PlaceNextTo"])
    by_line = OracleStepDataset(files, horizon=16, chunk_end="line")
    plain = OracleStepDataset(files, horizon=16)
    ep = by_line.episodes[0]
    nxt = ep.key_t[2]  # a key-step inside the episode
    t = nxt - 3
    line, full = by_line[t], plain[t]
    assert line["action_mask"].tolist() == [True] * 3 + [False] * 13
    torch.testing.assert_close(line["actions"][:3], full["actions"][:3])
    assert not torch.equal(line["actions"][3:], full["actions"][3:])  # the next line's actions are gone
    assert torch.all(line["actions"][3:, :6] == 0)
    assert torch.all(line["actions"][3:, 6] == full["actions"][2, 6])
    assert by_line.line_end(ep, t) == nxt and by_line.line_end(ep, nxt) == ep.key_t[3]
    assert by_line.line_end(ep, ep.length - 1) == ep.length
    torch.testing.assert_close(by_line[ep.length - 1]["actions"], plain[ep.length - 1]["actions"])
    with pytest.raises(ValueError, match="chunk_end"):
        OracleStepDataset(files, chunk_end="lines")


def test_swap_cache_info_keeps_stored_poses_all_episode(data):
    ds = OracleStepDataset(dataset_files(data, ["Swap"]))
    ep = ds.episodes[0]
    start = sum(e.length for e in ds.episodes[:0])
    late = ds[start + ep.length - 2]
    assert late["cache_info"].count("pose_dict[") == 3
    assert "move3d(" not in late["cache_info"] and "move3d(" in late["memory"]


def test_shifted_dataset_and_label_set_errors(data):
    files = dataset_files(data, ["Swap"])
    plain = OracleStepDataset(files, shift_k=0)
    shifted = OracleStepDataset(files, shift_k=3, shift_seed=1)
    assert [e.key_lines for e in plain.episodes] == [e.key_lines for e in shifted.episodes]
    assert any(a.key_t != b.key_t for a, b in zip(plain.episodes, shifted.episodes))
    from datamodules.schema import SchemaError

    with pytest.raises(SchemaError, match="no label set 'vlm'"):
        OracleStepDataset(files, label_set="vlm")
    with pytest.raises(FileNotFoundError, match="make data TASKS=Topple"):
        dataset_files(data, ["Topple"])


def test_dataloader_with_workers(data):
    ds = OracleStepDataset(dataset_files(data, ["PlaceNextTo", "Swap"]))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=2,
                                         multiprocessing_context="spawn")
    batch = next(iter(loader))
    assert batch["base_rgb"].shape == (8, 3, 32, 32) and len(batch["instruction"]) == 8


def test_normalisation_stats_match_the_data(data):
    files = dataset_files(data, ["PlaceNextTo", "Swap"])
    st = load_stats(files)
    ds = OracleStepDataset(files, horizon=1, load_images=False)
    actions = np.stack([ds[i]["actions"][0].numpy() for i in range(len(ds))])
    np.testing.assert_allclose(st["actions"]["mean"], actions.mean(0), atol=1e-5)
    np.testing.assert_allclose(st["actions"]["std"], actions.std(0), atol=1e-5)
    np.testing.assert_allclose(st["actions"]["max"], actions.max(0), atol=1e-6)
    assert st["qpos"]["count"] == len(ds)


def test_line_chunks_under_shifted_labels_end_where_the_labelled_skill_ended(data):
    """With shifted oracle labels (shift_k) a line's chunk still ends at the oracle's key-step
    that ended its skill in the recording: the shift moves only which label a step carries. A step
    whose label names a skill that has already ended holds at once."""
    files = dataset_files(data, ["PlaceNextTo"])
    oracle = OracleStepDataset(files, horizon=16, chunk_end="line")
    held_at_once = 0
    for shift_seed in range(4):
        shifted = OracleStepDataset(files, horizon=16, chunk_end="line", shift_k=3, shift_seed=shift_seed)
        start = 0  # the dataset index of the episode's first step
        for ep_s, ep_o in zip(shifted.episodes, oracle.episodes):
            assert len(ep_s.key_t) == len(ep_o.key_t) and ep_s.key_lines == ep_o.key_lines
            assert ep_s.line_ends == ep_o.key_t[1:] + [ep_o.length]
            for t in range(ep_s.length):
                i = sum(k <= t for k in ep_s.key_t) - 1  # the index of the line labelling t
                assert shifted.line_end(ep_s, t) == ep_s.line_ends[i]
                if ep_s.line_ends[i] <= t:  # its skill has ended: an all-hold chunk
                    s, o = shifted[start + t], oracle[start + ep_s.line_ends[i] - 1]
                    assert not s["action_mask"].any() and torch.all(s["actions"][:, :6] == 0)
                    assert torch.all(s["actions"][:, 6] == o["actions"][0, 6])  # the skill's last suction
                    held_at_once += 1
            start += ep_s.length
    assert held_at_once > 0  # the shifts did move some boundaries past a skill's end


def test_line_chunks_under_vlm_labels_use_the_recorded_ends_when_the_lines_match(data, tmp_path):
    """A VLM label set (``make relabel-dp``) whose key-steps come 2 steps early: with as many lines
    as the oracle's, a line's chunk ends where the oracle's skill ended; with another number of
    lines (the VLM merged two), at the VLM's own next key-step."""
    import shutil

    import h5py

    from datamodules.schema import write_label_set

    shutil.copytree(data, tmp_path / "data")
    files = dataset_files(tmp_path / "data", ["PlaceNextTo"])
    oracle = OracleStepDataset(files, chunk_end="line", load_images=False)
    first, second = oracle.episodes[:2]
    for ep, drop in ((first, False), (second, True)):
        key_t = [ep.key_t[0]]  # the VLM names each line up to 2 steps early
        for t in ep.key_t[1:]:
            key_t.append(max(t - 2, key_t[-1] + 1))
        lines = list(ep.key_lines)
        if drop:  # one line fewer: the third key-step's line merged into the second
            del key_t[2], lines[2]
        flags = [t in key_t for t in range(ep.length)]
        labels, line = [], None
        for t in range(ep.length):
            line = lines[key_t.index(t)] if flags[t] else line
            labels.append(line if flags[t] else f"# {line}")
        with h5py.File(tmp_path / "data" / "PlaceNextTo" / f"{ep.name}.h5", "r+") as f:
            write_label_set(f["episode"], "vlm", labels, flags)
    vlm = OracleStepDataset(files, chunk_end="line", load_images=False, label_set="vlm",
                            select=lambda task, seed: seed in (first.seed, second.seed))
    matched, merged = vlm.episodes
    assert matched.key_t != first.key_t and matched.line_ends == first.key_t[1:] + [first.length]
    assert merged.line_ends == merged.key_t[1:] + [merged.length]
    i = next(i for i in range(1, len(first.key_t)) if matched.key_t[i] == first.key_t[i] - 2)
    t = matched.key_t[i]  # a line the VLM names 2 steps before the oracle: it runs to the oracle's end
    assert vlm.line_end(matched, t) == first.line_ends[i] and vlm.line_end(matched, t - 1) == first.key_t[i]
