"""`make import-clevrskills`: ClevrSkills' trajectory folders -> a dataset of our HDF5 schema.

Usage: import_clevrskills.py SRC=<folder> [OUT=data/clevrskills] [LEVEL=fine|coarse] [WORKERS=1]
[key=value ...]   (config: configs/import_clevrskills.yaml; library: datamodules/clevrskills/)
Resumable: rerun the same command after an interruption. Trajectories that cannot be imported are
listed with their reasons in <OUT>/manifest.json; exit status 0 when at least one was imported.
"""

import sys

from configs import cli_config, run_entry_point

ALIASES = {"SRC": "src", "OUT": "out", "LEVEL": "level", "WORKERS": "workers", "TASK": "task"}


def main(argv: list[str]) -> int:
    cfg = cli_config("import_clevrskills", argv, ALIASES)
    from datamodules.clevrskills.importer import run_import

    manifest = run_import(cfg, progress=bool(cfg.progress))
    print(f"\n{'task':<16}{'episodes':>9}")
    for task, info in manifest["tasks"].items():
        print(f"{task:<16}{info['episodes']:>9}")
    print(f"\n{manifest['imported']} of {manifest['trajectories']} trajectories imported into {cfg.out} "
          f"(labels/oracle: {cfg.level}); {manifest['skipped']} skipped")
    for reason, n in list(manifest["skip_reasons"].items())[:10]:
        print(f"  {n:>6} x {reason}")
    if manifest["skipped"]:
        print(f"every skipped trajectory and its reason: {cfg.out}/manifest.json (skipped_trajectories)")
    if not manifest["imported"]:
        print("error: no trajectory could be imported", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_entry_point(main)
