"""`make export-llava`: LLaVA-format conversations (JSON + images) from one of our datasets.

Usage: export_llava.py DATA=<dataset> [OUT=outputs/llava] [LABELS=oracle] [TASKS=all] [key=value ...]
(config: configs/export_llava.yaml; library: datamodules/llava_export.py)
"""

from configs import cli_config, run_entry_point

ALIASES = {"DATA": "data_dir", "OUT": "out", "LABELS": "label_set", "TASKS": "tasks", "DATASET": "tasks"}


def main(argv: list[str]) -> int:
    cfg = cli_config("export_llava", argv, ALIASES)
    from datamodules.dataset import resolve_dataset_tasks
    from datamodules.llava_export import export_llava

    tasks = None if str(cfg.tasks) == "all" else resolve_dataset_tasks(cfg.tasks, cfg.data_dir)
    counts = export_llava(cfg.data_dir, cfg.out, tasks, label_set=str(cfg.label_set), frames=str(cfg.frames),
                          keystep_request=bool(cfg.keystep_request), grounding=int(cfg.grounding),
                          grid=int(cfg.grid), negatives=int(cfg.negatives), image_format=str(cfg.image_format),
                          seed=int(cfg.seed))
    print(f"wrote {cfg.out}/llava.json: {counts['samples']} samples ({counts['code']} code, {counts['grounding']} "
          f"grounding) from {counts['episodes']} episodes, {counts['images']} images in {cfg.out}/images/")
    return 0


if __name__ == "__main__":
    run_entry_point(main)
