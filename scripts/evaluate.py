"""`make eval`: roll out a policy on tasks with fixed seeds; writes a results table and TensorBoard logs.

Usage: evaluate.py POLICY=vlm_dp DP=<ckpt> VLM=<dir> [TASKS=L0+L1] [EPISODES=64] [WORKERS=1]
       [ENVS_PER_WORKER=1] [OUT=...] [key=value ...]                        (config: configs/eval.yaml)
The cameras render at the checkpoint's image size (the DP's, else the VLM's) unless
env.image_size=... is given.

Writes <out>/results.md (markdown table), <out>/results.csv (per task), <out>/episodes.csv (per
episode), <out>/videos/*.mp4 and TensorBoard scalars eval/success/<task>, eval/success/mean, the
table as text and the videos as animated GIFs under <out>/tb/.

Resumable: each finished episode is appended to <out>/episodes.jsonl at once, and the same command
after a crash or Ctrl-C runs only the episodes that are missing (a changed policy, option,
checkpoint file or episode setting starts the journal afresh).
"""

import sys
from pathlib import Path

from configs import cli_config, run_entry_point, to_yaml

ALIASES = {"POLICY": "policy", "DP": "dp", "VLM": "vlm", "TASKS": "tasks", "EPISODES": "episodes",
           "SEED_START": "seed_start", "WORKERS": "workers", "ENVS_PER_WORKER": "envs_per_worker", "OUT": "out",
           "MAX_STEPS": "max_steps",
           "N_ACTION_STEPS": "policy_options.n_action_steps", "HORIZON": "policy_options.horizon",
           "REGENERATE": "policy_options.regenerate_on_keystep", "DEVICE": "policy_options.device",
           "CONSTRAIN_OBJECTS": "policy_options.constrain_objects",
           "KEYSTEP_ON_HOLD": "policy_options.keystep_on_hold", "QUERY_EVERY_STEP": "policy_options.query_every_step",
           "REISSUE_AFTER": "policy_options.reissue_after", "CONFIRM_LINE_END": "policy_options.confirm_line_end",
           "STOP_ON_DONE": "policy_options.stop_on_done", "PEAK_WINDOW": "policy_options.keypoint_peak_window",
           "HOLD_TARGETS": "policy_options.keypoint_target_hold"}


def policy_spec(cfg):
    from policies.spec import OPTIONS, PolicySpec

    kind = str(cfg.policy)
    def unset(k, v):  # 0 means "the checkpoint's own" for the chunk sizes; False is a real value
        return v is None or v == "" or (k in ("n_action_steps", "horizon") and v == 0)

    options = {k: v for k, v in dict(cfg.policy_options).items()
               if k in OPTIONS.get(kind, ()) and not unset(k, v)}
    return PolicySpec(kind, dp=cfg.dp, vlm=cfg.vlm, options=options)


def checkpoint_image_size(policy) -> int | None:
    """The camera size a policy was trained at: its DP's ``model.image_size``, else its VLM's."""
    dp = getattr(policy, "dp", None)
    if dp is not None:
        return int(dp.model.image_size)
    planner = getattr(policy, "planner", None)
    size = getattr(getattr(planner, "model", None), "config", None)
    size = getattr(getattr(size, "vision_config", None), "image_size", None)
    return int(size) if size else None


def main(argv: list[str]) -> int:
    cfg = cli_config("eval", argv, ALIASES)
    from policies.spec import build_policy

    spec = policy_spec(cfg).validate()
    import envs

    tasks = envs.cli_tasks(cfg.tasks)
    policy = build_policy(spec)  # load once here: a bad checkpoint is one error, not N broken workers
    from policies.evaluator import EpisodeJournal, evaluate

    if not any(a.startswith("env.image_size=") for a in argv):  # the checkpoint's own camera size
        cfg.env.image_size = checkpoint_image_size(policy) or cfg.env.image_size
    print(to_yaml(cfg))
    workers, envs_per_worker = int(cfg.workers), int(cfg.envs_per_worker)
    if workers > 0 or envs_per_worker > 1:
        policy = spec  # each process builds its own policies (B of them sharing the networks) from the spec
    journal = EpisodeJournal(Path(cfg.out) / "episodes.jsonl", fingerprint(cfg, spec))
    wanted = {(t, s) for t in tasks for s in range(int(cfg.seed_start), int(cfg.seed_start) + int(cfg.episodes))}
    done = {k: v for k, v in journal.done().items() if k in wanted}
    if done:
        print(f"resuming: {len(done)} of {len(wanted)} episodes already done ({journal.path})")
    result = evaluate(policy, tasks, int(cfg.episodes), seed_start=int(cfg.seed_start), workers=workers,
                      envs_per_worker=envs_per_worker, image_size=int(cfg.env.image_size), backend=str(cfg.env.backend),
                      max_steps=int(cfg.max_steps) or None, stop_on_success=bool(cfg.stop_on_success),
                      video_episodes=int(cfg.video_episodes), progress=True, done=done, on_episode=journal.add)
    write_outputs(cfg, result)
    print(result.table_markdown())
    print(f"{sum(r.n for r in result.per_task.values())} episodes in {result.seconds:.0f} s; wrote "
          f"{cfg.out}/results.md, results.csv, episodes.csv, videos/ and tb/")
    print(f"mean_success={result.mean_success:.4f}")
    return 0


def fingerprint(cfg, spec) -> dict:
    """What decides an episode's outcome besides its task and seed: the policy, its options, the
    checkpoint files (their contents' SHA-256: a copied checkpoint resumes, a retrained one starts
    afresh) and the episode settings."""
    import hashlib

    def digest(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]

    def files(path) -> list:
        if not path or not Path(path).exists():
            return []
        root = Path(path)
        found = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        return [[p.name if p == root else str(p.relative_to(root)), digest(p)] for p in found]

    return {"policy": spec.kind, "options": dict(spec.options), "dp": files(spec.dp), "vlm": files(spec.vlm),
            "image_size": int(cfg.env.image_size), "backend": str(cfg.env.backend), "max_steps": int(cfg.max_steps),
            "stop_on_success": bool(cfg.stop_on_success)}


def write_outputs(cfg, result) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from callbacks.media import log_videos

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "results.md").write_text(result.table_markdown())
    result.to_csv(out / "results.csv")
    result.episodes_csv(out / "episodes.csv")
    writer = SummaryWriter(str(out / "tb"))
    try:
        for name, value in result.metrics(prefix="eval").items():
            writer.add_scalar(name, value, 0)
        writer.add_text("eval/results", result.table_markdown(), 0)
        log_videos(result.videos, out / "videos", writer, step=0, tag="eval/video")
    finally:
        writer.close()


if __name__ == "__main__":
    run_entry_point(main)
