"""Intra-op threads that follow a file: the training callback and `make demo`'s parallel stages."""

import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.threads import ThreadsFromFile, read_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.parametrize("text, expected", [("2\n", 2), (" 3 ", 3), ("", None), ("two", None), ("0", None),
                                            ("-1", None)])
def test_read_threads(tmp_path, text, expected):
    path = tmp_path / "t.threads"
    path.write_text(text)
    assert read_threads(path) == expected
    assert read_threads(tmp_path / "missing") is None


class Regression(L.LightningModule):
    def __init__(self, path: Path, switch_at: int):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.path, self.switch_at = path, switch_at
        self.threads: list[int] = []

    def training_step(self, batch, batch_idx):
        self.threads.append(torch.get_num_threads())
        if self.global_step == self.switch_at:
            self.path.write_text("2\n")  # as make demo writes it when the other training ends
        x = torch.randn(8, 4)
        return self.layer(x).square().mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_training_takes_the_threads_the_file_gives(tmp_path):
    before = torch.get_num_threads()
    path = tmp_path / "dp.threads"
    path.write_text("1\n")
    module = Regression(path, switch_at=5)
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ThreadsFromFile(path, every_n_steps=10)])
    try:
        trainer.fit(module)
        # one thread until the first check after the file changed (step 10), two from then on
        assert module.threads[:10] == [1] * 10
        assert module.threads[10:] == [2] * 20
    finally:
        torch.set_num_threads(before)


def test_demo_gives_the_freed_core_to_the_stage_still_running(tmp_path):
    from demo import parallel_stages

    started = tmp_path / "long.started"
    short = tmp_path / "short.py"
    # the short stage ends only after the long one has read its first value (a loaded machine may start it late)
    short.write_text(textwrap.dedent(f"""
        import pathlib, sys, time
        assert open(sys.argv[1].split("=", 1)[1]).read().strip() == "1"
        deadline = time.time() + 30
        while not pathlib.Path({str(started)!r}).exists() and time.time() < deadline:
            time.sleep(0.05)
    """))
    long = tmp_path / "long.py"
    long.write_text(textwrap.dedent(f"""
        import pathlib, sys, time
        path = sys.argv[1].split("=", 1)[1]
        seen = [open(path).read().strip()]
        pathlib.Path({str(started)!r}).touch()
        deadline = time.time() + 30
        while seen[-1] != "2" and time.time() < deadline:
            time.sleep(0.1)
            seen.append(open(path).read().strip())
        print("threads", " ".join(dict.fromkeys(seen)))
        sys.exit(0 if seen[-1] == "2" else 4)
    """))
    logs = tmp_path / "logs"
    parallel_stages([("short", str(short), []), ("long", str(long), [])], logs, cores=2)
    assert (logs / "long.log").read_text().strip() == "threads 1 2"
    assert (logs / "long.threads").read_text().strip() == "2"

    started.unlink()
    failing = tmp_path / "failing.py"
    failing.write_text(textwrap.dedent(f"""
        import pathlib, sys, time
        deadline = time.time() + 30
        while not pathlib.Path({str(started)!r}).exists() and time.time() < deadline:
            time.sleep(0.05)
        sys.exit(3)
    """))
    with pytest.raises(subprocess.CalledProcessError) as info:
        parallel_stages([("failing", str(failing), []), ("long", str(long), [])], logs, cores=2)
    assert info.value.returncode == 3
    assert (logs / "long.log").read_text().strip() == "threads 1 2"  # it ran to its end with two
