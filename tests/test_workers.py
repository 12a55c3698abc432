"""configs.workers: the spawned worker processes of data generation, import and evaluation."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARENT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[2])
    from configs.workers import spawn_pool

    def job(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)

    if __name__ == "__main__":
        with spawn_pool(2) as pool:
            for i in range(2):
                pool.submit(job, f"{sys.argv[1]}.{i}")
            time.sleep(300)
""")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has ended (its new parent may not reap it at once)


def _wait(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_workers_end_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    stem = tmp_path / "worker"
    parent = subprocess.Popen([sys.executable, str(script), str(stem), str(ROOT)])
    try:
        files = [Path(f"{stem}.{i}") for i in range(2)]
        assert _wait(lambda: all(f.exists() and f.read_text() for f in files), 120), "the workers did not start"
        pids = [int(f.read_text()) for f in files]
        time.sleep(1.0)
        assert all(_running(p) for p in pids), "the workers should be busy with their jobs"
        parent.send_signal(signal.SIGKILL)  # no exit handlers, no pool shutdown: the workers are on their own
        parent.wait(10)
        assert _wait(lambda: not any(_running(p) for p in pids), 20), "the workers outlived their killed parent"
    finally:
        parent.kill()
        for f in tmp_path.glob("worker.*"):
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
