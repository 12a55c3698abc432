"""`make check-data`: verify every episode file of a dataset; REPAIR=1 quarantines the bad ones.

Usage: check_data.py DATA=<folder> [TASKS=...] [REPAIR=1] [key=value ...]   (config: configs/check_data.yaml)
Exit status: 0 when the dataset is sound (or was repaired), 1 when bad files remain, 2 on bad input.
After a repair, `make data` with the dataset's settings regenerates the quarantined seeds.
"""

import sys
from pathlib import Path

from configs import cli_config, run_entry_point

ALIASES = {"DATA": "data_dir", "TASKS": "tasks", "DATASET": "tasks", "REPAIR": "repair"}


def main(argv: list[str]) -> int:
    cfg = cli_config("check_data", argv, ALIASES)
    from configs import MissingInputError
    from datamodules.check import check_dataset, index_files, repair, repair_command

    folder = Path(cfg.data_dir)
    if not folder.is_dir():
        raise MissingInputError(f"DATA={folder}: no such dataset folder")
    tasks = None
    if str(cfg.tasks) != "all":
        from envs import resolve_tasks

        tasks = [t for t in resolve_tasks(cfg.tasks) if (folder / f"{t}.h5").exists()]
    if not index_files(folder, tasks):
        raise MissingInputError(f"DATA={folder} holds no task index files (<Task>.h5 beside a <Task>/ folder); "
                                f"is it a dataset written by `make data`?")
    counts, problems = check_dataset(folder, tasks, decode_images=bool(cfg.decode_images),
                                     progress=bool(cfg.progress))
    print(f"\n{'task':<14}{'episodes':>9}{'bad':>5}")
    for task, n in counts.items():
        print(f"{task:<14}{n:>9}{sum(p.task == task for p in problems):>5}")
    for p in problems:
        print(f"  {p.path}: {p.reason}")
    if not problems:
        print(f"\n{folder}: all {sum(counts.values())} episodes are sound")
        return 0
    if not cfg.repair:
        print(f"\n{len(problems)} bad file(s); move them aside with `{repair_command(folder)}`", file=sys.stderr)
        return 1
    moved = repair(folder, problems)
    print(f"\nmoved {len(moved)} file(s) to {folder / 'quarantine'} and rewrote the index(es) of "
          f"{sorted({p.task for p in problems})}; regenerate the missing seeds with `make data OUT={folder}` "
          f"(with the dataset's TASKS and EPISODES)")
    return 0


if __name__ == "__main__":
    run_entry_point(main)
