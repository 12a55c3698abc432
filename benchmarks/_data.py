"""A small oracle dataset for the benchmarks that need one and were given no ``--data``."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def small_dataset(out, tasks: str, episodes: int) -> str:
    """``make data`` of ``episodes`` per task (comma list ``tasks``, 64 px) into ``out``; returns ``out``."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_data.py"), f"OUT={out}", f"TASKS={tasks}",
                    f"EPISODES={episodes}", "env.image_size=64"], check=True, capture_output=True, cwd=ROOT)
    return str(out)
