"""The parallel evaluator (real simulator, OracleOnly) and `make eval` (scripts/evaluate.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from policies.evaluator import DEFAULT_SEED_START, evaluate, evaluation_seeds, success_metrics, worker_threads
from policies.spec import PolicySpec

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["Push", "Topple"]
SEEDS = [100000, 100001, 100002, 100003, 100004]
# Push takes 27-45 steps on these seeds: a cap of 30 mixes successes and step-cap failures
KWARGS = dict(seeds=SEEDS, image_size=32, max_steps=30, video_episodes=0)


def outcomes(result):
    return {(e.task, e.seed): (e.success, e.steps, e.failure) for e in result.episodes}


@pytest.fixture(scope="module")
def one_process():
    return evaluate(PolicySpec("oracle"), TASKS, workers=0, **KWARGS)


def test_default_seeds_are_fixed_and_far_from_data_seeds():
    assert DEFAULT_SEED_START == 100000
    assert evaluation_seeds() == list(range(100000, 100064))
    assert evaluation_seeds(3, 7) == [7, 8, 9]


def test_worker_threads_follow_omp_num_threads_else_share_the_cores(monkeypatch):
    cores = os.cpu_count() or 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert worker_threads(1) == 1  # evaluations side by side: one thread each, whatever the worker count
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads(2) == 3
    for unusable in ("", "0", "-2", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert worker_threads(1) == cores
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert worker_threads(2) == max(1, cores // 2)
    assert worker_threads(4 * cores) == 1


def test_one_process_results_mix_successes_and_failures(one_process):
    res = one_process
    assert [(e.task, e.seed) for e in res.episodes] == [(t, s) for t in TASKS for s in SEEDS]
    push = res.per_task["Push"]
    assert 0 < push.successes < push.n
    assert push.failure_reasons == {"step cap": push.n - push.successes}
    assert all(e.steps == 30 for e in push.episodes if not e.success)
    assert res.per_task["Topple"].success_rate == 1.0


def test_two_spawn_workers_give_the_same_per_seed_results(one_process):
    two = evaluate(PolicySpec("oracle"), TASKS, workers=2, **KWARGS)
    assert outcomes(two) == outcomes(one_process)
    np.testing.assert_array_equal(two.counts(), one_process.counts())


@pytest.mark.parametrize("workers, envs", [(0, 3), (1, 2)])
def test_environments_stepped_side_by_side_give_the_same_per_seed_results(one_process, workers, envs):
    """B environments per process (slots refilled from the job queue as episodes end, shared by
    the workers): the per-seed results and their order do not change."""
    batched = evaluate(PolicySpec("oracle"), TASKS, workers=workers, envs_per_worker=envs, **KWARGS)
    assert [(e.task, e.seed) for e in batched.episodes] == [(t, s) for t in TASKS for s in SEEDS]
    assert outcomes(batched) == outcomes(one_process)


def test_rank_shards_partition_the_seeds_and_sum_to_the_totals(one_process):
    shards = [evaluate(PolicySpec("oracle"), TASKS, rank=r, world_size=2, **KWARGS) for r in (0, 1)]
    assert sorted({e.seed for e in shards[0].episodes}) == SEEDS[0::2]
    assert sorted({e.seed for e in shards[1].episodes}) == SEEDS[1::2]
    merged = {**outcomes(shards[0]), **outcomes(shards[1])}
    assert merged == outcomes(one_process)
    total = shards[0].counts() + shards[1].counts()
    np.testing.assert_array_equal(total, one_process.counts())
    assert success_metrics(TASKS, total) == one_process.metrics()


def test_tables(one_process):
    md = one_process.table_markdown()
    push = one_process.per_task["Push"]
    assert f"| Push | {100 * push.success_rate:.1f}% | {push.successes} / 5 |" in md
    assert "step cap (" in md and "| **mean** |" in md
    rows = one_process.to_csv().splitlines()
    assert rows[0].startswith("task,episodes,successes,success_rate,mean_length,failure_reasons")
    assert rows[2].startswith("Topple,5,5,1.0000,")
    assert len(one_process.episodes_csv().splitlines()) == 1 + 10
    m = one_process.metrics()
    assert m["rollout/success/Topple"] == 1.0 and m["rollout/episodes"] == 10
    assert m["rollout/success/mean"] == pytest.approx((push.success_rate + 1.0) / 2)


def run_script(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["POLICY=teleport"], "unknown policy 'teleport'"),
    (["POLICY=flat_dp"], "needs a DP checkpoint"),
    (["POLICY=vlm_dp", "DP=/nonexistent/dp.ckpt", "VLM=/nonexistent/vlm"], "does not exist"),
    (["POLICY=oracle", "TASKS=Nowhere"], "unknown task or level 'Nowhere'"),
    (["EPISODES=many"], "expected int"),
    (["POLICY=oracle", "WHATEVER=1"], "unknown variable WHATEVER="),
    (["POLICY=oracle", "EPISODES=-1"], "episodes=-1 in eval: must be >= 1"),
    (["POLICY=oracle", "CONFIRM_LINE_END=-1"], "confirm_line_end=-1 in eval: must be >= 0"),
    (["POLICY=flat_dp", f"DP={ROOT / 'README.md'}"], "is not a diffusion-policy checkpoint"),
    (["POLICY=vlm_oracle", f"VLM={ROOT / 'configs'}"], "is not an exported VLM"),
])
def test_eval_script_bad_input_is_one_error_line_and_exit_2(tmp_path, args, message):
    proc = run_script(*args, f"OUT={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_eval_script_writes_tables_tensorboard_and_videos(tmp_path):
    out = tmp_path / "eval"
    proc = run_script("POLICY=oracle", "TASKS=Topple", "EPISODES=2", "WORKERS=0", "env.image_size=32", f"OUT={out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "mean_success=1.0000"
    assert "| Topple | 100.0% | 2 / 2 |" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().splitlines()[1].startswith("Topple,2,2,1.0000,")
    assert (out / "videos" / "Topple_seed100000_success.mp4").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Scalars("eval/success/Topple")[0].value == 1.0
    assert acc.Scalars("eval/success/mean")[0].value == 1.0
    gif = acc.Images("eval/video/Topple/seed100000")[0].encoded_image_string
    assert gif[:6] == b"GIF89a"


def test_kill_9_during_eval_then_rerun_gives_complete_results_without_duplicates(tmp_path):
    import signal
    import time

    out = tmp_path / "eval"
    args = ["POLICY=oracle", "TASKS=Topple", "EPISODES=4", "WORKERS=0", "env.image_size=32", f"OUT={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    time.sleep(12)  # loading and the first episodes
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = run_script(*args)
    assert rerun.returncode == 0, rerun.stderr
    rows = (out / "episodes.csv").read_text().strip().splitlines()[1:]
    assert sorted(r.split(",")[1] for r in rows) == [str(100000 + i) for i in range(4)]  # each seed once
    assert (out / "results.csv").read_text().splitlines()[1].startswith("Topple,4,4,")


def test_eval_script_resumes_from_its_episode_journal(tmp_path):
    """episodes.jsonl: the episodes finished before a crash (a last line cut short is dropped) are
    not run again and the results are those of a run without the crash; another setting starts afresh."""
    import json

    out = tmp_path / "eval"
    args = ["POLICY=oracle", "TASKS=Push,Topple", "EPISODES=2", "MAX_STEPS=30", "env.image_size=32",
            "video_episodes=0", f"OUT={out}"]
    first = run_script(*args, "WORKERS=0")
    assert first.returncode == 0, first.stderr
    full = (out / "episodes.csv").read_text()
    journal = (out / "episodes.jsonl").read_text().splitlines()
    assert len(journal) == 5 and "fingerprint" in json.loads(journal[0])
    (out / "episodes.jsonl").write_text("\n".join(journal[:3]) + '\n{"task": "Topple", "se')  # killed mid-line
    resumed = run_script(*args, "WORKERS=2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 2 of 4 episodes already done" in resumed.stdout
    assert (out / "episodes.csv").read_text() == full
    entries = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()[1:]]
    assert sorted((e["task"], e["seed"]) for e in entries) == [(t, s) for t in ("Push", "Topple")
                                                               for s in (100000, 100001)]
    again = run_script(*args[:-1], "MAX_STEPS=25", f"OUT={out}", "WORKERS=0")
    assert again.returncode == 0 and "resuming" not in again.stdout
    assert json.loads((out / "episodes.jsonl").read_text().splitlines()[0])["fingerprint"]["max_steps"] == 25


def test_journal_fingerprint_follows_checkpoint_contents_not_file_times(tmp_path):
    """A copied checkpoint (new file time, same bytes) keeps the fingerprint, so its evaluation
    resumes; a checkpoint with other bytes (retrained in place) changes it."""
    import shutil

    from omegaconf import OmegaConf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from evaluate import fingerprint

    cfg = OmegaConf.create({"env": {"image_size": 64, "backend": "auto"}, "max_steps": 100, "stop_on_success": True})
    dp = tmp_path / "a" / "policy.pt"
    dp.parent.mkdir()
    dp.write_bytes(b"weights" * 1000)
    copy = tmp_path / "b" / "policy.pt"
    copy.parent.mkdir()
    shutil.copy(dp, copy)
    os.utime(copy, (1, 1))
    first = fingerprint(cfg, PolicySpec("flat_dp", dp=str(dp)))
    assert fingerprint(cfg, PolicySpec("flat_dp", dp=str(copy))) == first
    copy.write_bytes(b"other!!" * 1000)  # same size, other contents
    assert fingerprint(cfg, PolicySpec("flat_dp", dp=str(copy))) != first
