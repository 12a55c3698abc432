"""Evaluation throughput of VLM+DP on L0: one environment per process against B per process.

    python benchmarks/eval_throughput.py [--dp RUN/policy.pt] [--vlm RUN/export] [--envs 16]
                                         [--seeds 16] [--max-steps 0] [--quick]

Both evaluators run the same episodes (the L0 tasks, seeds 100000, 100001, ... per task) in this
process on one thread, so at equal core count (one core each):

* serial: one environment, episodes one after another (``run_episode``), as each process of
  ``make eval WORKERS=N`` runs them;
* batched: ``--envs`` B environments stepped side by side (``run_batched``, ``make eval
  ENVS_PER_WORKER=B``), their VLM queries and DP chunks sent to the networks as batches.

Each gets its own copy of the networks (no cache is shared between them). Networks are loaded and
environments created before the clock starts (a worker's one-time costs). The clock is the
process's CPU time (renderer threads included: on an idle machine with one thread it is the wall
time; on a busy one it leaves out the time other processes hold the core); wall time is printed
too. Per evaluator: environment steps per second, episodes per hour at the mean length of these
episodes, the projection for the paper's protocol (64 seeds x 11 tasks = 704 episodes) at that
length, per core, and the milliseconds per step spent in VLM queries, DP chunks and the
environments. Also reported: how many per-seed results are the same (batched matrix products
round differently, which can move a closed-loop episode by a step), and the episodes that ended
as "context full" (a VLM that writes a new key-step at most steps until its prompt no longer
fits the model's positions, ``VLMPlanner.check_context``) with their share of the serial time.

Without ``--dp`` a random-init cpu-preset DP is used (the cost does not depend on the weights);
without ``--vlm``, ``outputs/demo/vlm/export`` or ``outputs/vlm/cpu/export``, else a VLM trained
briefly (as benchmarks/hierarchical_step.py does: its lines are not a trained model's, so its
decoding cost is not either). Ends with ``batched_over_serial=<serial CPU s / batched CPU s>``
(goal >= 2).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
PAPER_EPISODES = 64 * 11


def load_config(vlm):
    """The text config of an exported VLM (for its number of positions)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(vlm).text_config
    except Exception:  # noqa: BLE001: a run folder or a checkpoint: not reported
        return None


class Shares:
    """CPU seconds spent in the VLM queries, the DP chunks and the environments (reset, step)."""

    def __init__(self):
        from policies.batching import ChunkRequest, PlanRequest
        from policies.episodes import Episode

        self.seconds = {"VLM": 0.0, "DP": 0.0, "env": 0.0}
        for cls, names, key in ((PlanRequest, ("run", "run_many"), "VLM"), (ChunkRequest, ("run", "run_many"), "DP"),
                                (Episode, ("__init__", "apply"), "env")):
            for name in names:
                self.wrap(cls, name, key)

    def wrap(self, cls, name: str, key: str) -> None:
        f = cls.__dict__[name]
        static = isinstance(f, staticmethod)
        f = f.__func__ if static else f

        def timed(*args, **kwargs):
            t = time.process_time()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[key] += time.process_time() - t
        setattr(cls, name, staticmethod(timed) if static else timed)


def run(kind: str, spec, jobs, envs: dict, b: int, max_steps, shares: Shares):
    """(outcomes in job order, CPU seconds, wall seconds, steps, shares, per episode (CPU s,
    final prompt tokens) for the serial one) of one evaluator."""
    from policies.episodes import frozen_gc, run_batched, run_episode
    from policies.spec import build_policies

    policies = build_policies(spec, b)
    shares.seconds = dict.fromkeys(shares.seconds, 0.0)
    per_episode = []
    with frozen_gc():  # as the evaluator does
        cpu, wall = time.process_time(), time.perf_counter()
        if kind == "serial":
            out = []
            for task, seed, _ in jobs:
                t = time.process_time()
                out.append(run_episode(envs[(0, task)], policies[0], seed, max_steps=max_steps)[0])
                per_episode.append((time.process_time() - t, out[-1].failure == "context full"))
        else:
            found = run_batched(policies, jobs, lambda slot, task: envs[(slot, task)], max_steps=max_steps)
            out = [found[i][0] for i in range(len(jobs))]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return out, cpu, wall, sum(r.steps for r in out), dict(shares.seconds), per_episode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", default=None)
    ap.add_argument("--vlm", default=None)
    ap.add_argument("--data", default="data/oracle", help="for a briefly trained VLM when there is none")
    ap.add_argument("--envs", type=int, default=16, help="B: environments of the batched evaluator")
    ap.add_argument("--seeds", type=int, default=16, help="episodes per L0 task")
    ap.add_argument("--max-steps", type=int, default=0, help="episode cap (0: the task's own)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="B = 4, 2 seeds per task, 40-step episodes (< 2 min)")
    args = ap.parse_args()
    if args.quick:
        args.envs, args.seeds, args.max_steps = 4, 2, args.max_steps or 40
    import torch

    torch.set_num_threads(1)
    import envs as envs_pkg
    from envs import resolve_tasks
    from hierarchical_step import fresh_dp
    from policies.spec import PolicySpec, build_policy
    from vlm_early_stop import ensure_data, ensure_vlm

    tasks = resolve_tasks("L0")
    jobs = [(task, 100000 + i, False) for task in tasks for i in range(args.seeds)]
    max_steps = args.max_steps or None
    with tempfile.TemporaryDirectory() as tmp:
        vlm = args.vlm or next((p for p in ("outputs/demo/vlm/export", "outputs/vlm/cpu/export") if Path(p).exists()),
                               None)
        if vlm is None:
            data = ensure_data(args.data, ["PlaceOnTop"], tmp)
            vlm = ensure_vlm(None, data, 30 if args.quick else 300, tmp)
        dp = args.dp
        if dp is None:
            data = ensure_data(args.data, ["PlaceOnTop"], tmp)
            dp = fresh_dp(data, Path(tmp) / "dp.pt")
        spec = PolicySpec("vlm_dp", dp=str(dp), vlm=str(vlm), options={"device": "cpu"}).validate()
        limit = int(getattr(load_config(vlm), "max_position_embeddings", 0) or 0)
        wrist = build_policy(spec).reads_wrist  # as the evaluator does (policies.episodes.cached_env)
        envs = {(slot, task): envs_pkg.make_env(task, image_size=args.image_size, wrist_camera=wrist)
                for slot in range(args.envs) for task in tasks}
        shares = Shares()
        try:
            serial = run("serial", spec, jobs, envs, 1, max_steps, shares)
            batched = run("batched", spec, jobs, envs, args.envs, max_steps, shares)
        finally:
            for env in envs.values():
                env.close()
    same = sum((a.success, a.steps) == (b.success, b.steps) for a, b in zip(serial[0], batched[0]))
    steps = serial[3]
    length = steps / len(jobs)
    print(f"VLM+DP on L0 ({', '.join(tasks)}), {args.seeds} seeds per task = {len(jobs)} episodes of mean length "
          f"{length:.1f} steps ({'cap ' + str(max_steps) if max_steps else 'the tasks caps'}), "
          f"{args.image_size} px, one thread; VLM {vlm}, DP {args.dp or 'random-init cpu preset'}")
    print(f"same per-seed results (success, steps): {same}/{len(jobs)}; "
          f"successes serial {sum(r.success for r in serial[0])}, batched {sum(r.success for r in batched[0])}")
    print(f"{'evaluator':<20}{'CPU s':>7}{'wall s':>8}{'steps/s':>9}{'episodes/h':>11}{'704 episodes (h)':>17}"
          f"{'ms/step: VLM':>14}{'DP':>6}{'env':>6}{'other':>7}")
    for name, (_, cpu, wall, n, sec, _) in (("serial (1 env)", serial), (f"batched ({args.envs} envs)", batched)):
        rate = n / cpu
        other = cpu - sum(sec.values())
        print(f"{name:<20}{cpu:>7.1f}{wall:>8.1f}{rate:>9.1f}{3600 * rate / length:>11.0f}"
              f"{PAPER_EPISODES * length / rate / 3600:>17.2f}{1e3 * sec['VLM'] / n:>14.1f}{1e3 * sec['DP'] / n:>6.1f}"
              f"{1e3 * sec['env'] / n:>6.1f}{1e3 * other / n:>7.1f}")
    print(f"paper protocol (64 seeds x 11 tasks) at {length:.0f} steps per episode, per core; "
          f"wall-time ratio {serial[2] / batched[2]:.2f}")
    full = [c for c, ended in serial[5] if ended]
    print(f"{len(full)} of {len(jobs)} episodes ended as 'context full' (the VLM prompt outgrew the model's "
          f"{limit} positions); they took {100 * sum(full) / serial[1]:.0f} % of the serial CPU time")
    print(f"batched_over_serial={serial[1] / batched[1]:.2f}")


if __name__ == "__main__":
    main()
