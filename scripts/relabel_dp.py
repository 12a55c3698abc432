"""`make relabel-dp`: VLM instructions for the diffusion-policy data (stored as labels/vlm).

Usage: relabel_dp.py [DATASET=L0] [DATA=data/oracle] VLM=<export folder | run folder | .ckpt>
[key=value ..]. Resumable (episodes already relabelled by this VLM are skipped), crash-safe
(each episode file is rewritten through a temporary copy); ends with a table of agreement with
the oracle labels.
"""

import sys

from configs import cli_config, run_entry_point, to_yaml

ALIASES = {"DATASET": "tasks", "TASKS": "tasks", "DATA": "data_dir", "VLM": "vlm"}


def main(argv: list[str]) -> int:
    cfg = cli_config("relabel", argv, ALIASES)
    from pathlib import Path

    from configs import MissingInputError
    from datamodules.dataset import dataset_files, resolve_dataset_tasks
    from lightning_modules.vlm.relabel import mode_name, plan, relabel, summary, vlm_identity
    from policies.vlm_planner import VLMPlanner

    if not Path(cfg.vlm).exists():
        raise MissingInputError(f"VLM={cfg.vlm}: no such exported VLM folder or checkpoint; "
                                f"train one with `make train-vlm` (it writes <out>/export)")
    files = dataset_files(cfg.data_dir, resolve_dataset_tasks(cfg.tasks, cfg.data_dir))
    on_line_end = bool(cfg.keystep_on_line_end)
    todo, _ = plan(files, cfg.label_set, vlm_identity(cfg.vlm), bool(cfg.overwrite), mode_name(on_line_end))
    overrides = {} if cfg.early_stop_k is None else {"early_stop_k": int(cfg.early_stop_k)}
    planner = VLMPlanner.from_pretrained(cfg.vlm, device=cfg.device, **overrides) if todo else None
    print(to_yaml(cfg))
    stats = relabel(files, planner, cfg.vlm, cfg.label_set, bool(cfg.overwrite), progress=bool(cfg.progress),
                    keystep_on_line_end=on_line_end)
    print(summary(stats))
    print(f"\nwrote labels/{cfg.label_set} into the episode files of {cfg.data_dir}; train the diffusion "
          f"policy on them with `make train-dp CONDITIONING=vlm DATA={cfg.data_dir}`")
    return 0


if __name__ == "__main__":
    run_entry_point(main)
