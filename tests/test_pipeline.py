"""The whole chain on tiny settings, through the entry points users run (as `make demo` does):

generate data -> train the tiny VLM -> train the cpu-preset DP with the rollout callback using
that VLM (VLM+DP in the simulator) -> TensorBoard holds `rollout/success/*` -> `make eval`'s
script evaluates the same checkpoints and writes its table.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=600):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"{script} failed:\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_data_vlm_dp_rollouts_eval_chain(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, vlm, dp, ev = (tmp_path / n for n in ("data", "vlm", "dp", "eval"))
    run("generate_data.py", f"OUT={data}", "TASKS=PlaceOnTop", "EPISODES=3", "env.image_size=32")
    run("train_vlm.py", f"DATA={data}", "DATASET=PlaceOnTop", f"OUT={vlm}", "STEPS=6",
        "trainer.val_check_interval=6", "trainer.enable_progress_bar=false")
    assert (vlm / "export").is_dir()
    run("train_dp.py", f"DATA={data}", "DATASET=PlaceOnTop", f"OUT={dp}", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "data.num_workers=0", "data.batch_size=8", "val_sample_batches=1",
        "model.image_size=32", "model.resnet_width=8", "model.unet_channels=[32,64,128]",
        "trainer.enable_progress_bar=false", "rollout.every_n_val_epochs=1", "rollout.episodes=1",
        "rollout.max_steps=6", f"rollout.vlm={vlm / 'export'}")
    ea = EventAccumulator(str(dp / "tb"))
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"rollout/success/PlaceOnTop", "rollout/success/mean"} <= scalars, scalars
    assert [e.value for e in ea.Scalars("rollout/failed_ranks")] == [0.0, 0.0]  # two rounds, no failure
    assert len(ea.Scalars("rollout/success/mean")) == 2

    r = run("evaluate.py", "POLICY=vlm_dp", f"DP={dp / 'policy.pt'}", f"VLM={vlm / 'export'}", "TASKS=PlaceOnTop",
            "EPISODES=2", "WORKERS=0", "MAX_STEPS=6", f"OUT={ev}", "env.image_size=32")
    assert "mean_success=" in r.stdout
    assert "PlaceOnTop" in (ev / "results.md").read_text()
