"""Data scaling (paper 5.1, Figure 4 right): L0 against L0 with twice the PlaceNextTo and PlaceOnTop data.

    python experiments/data_scaling.py [--preset cpu|paper] [--quick] [--jobs N] [--dry-run] [name=value ...]

One VLM trained on L0 and L1 (so that it can plan the stacking tasks), and two code DPs: one on
the L0 dataset, one on L0 with twice the PlaceNextTo and PlaceOnTop demonstrations (the first half
are the same seeds). Both evaluated as VLM+DP on L0 and on SingleStack and StackTopple, whose
demonstrations the DPs never see. Output: outputs/exp/data_scaling/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.paper_results import FINDINGS  # noqa: E402
from experiments.report import Check, Layout, Variant, difference, pacing_note  # noqa: E402
from experiments.runner import Experiment, run_experiment  # noqa: E402

SIZES = {  # episodes: demonstrations per task of the base dataset
    "cpu": {"episodes": 100, "vlm_steps": 4000, "dp_steps": 8000},  # L0 preset: 13000; 8000 fits 2 h
    "paper": {"episodes": 2000, "vlm_steps": 10000, "dp_steps": 200000},
    "quick": {"episodes": 3, "vlm_steps": 6, "dp_steps": 10},
}
L0 = ["PlaceOnTop", "PlaceNextTo", "Push", "Topple"]
STACKING = ["SingleStack", "StackTopple"]
DOUBLED = ["PlaceNextTo", "PlaceOnTop"]


def build(b, s) -> Experiment:
    n = s["episodes"]
    data = b.data("data", L0 + ["PushToTarget"] + STACKING, n)
    large = b.data("data_l0_large", L0, {t: 2 * n if t in DOUBLED else n for t in L0})
    vlm = b.vlm("vlm", data, L0 + ["PushToTarget"] + STACKING)
    tasks = L0 + STACKING
    variants = [
        Variant("vlm_dp_L0", f"VLM+DP, L0 ({n} each)",
                b.eval("eval_L0", "vlm_dp", tasks, dp=b.dp("dp_L0", data, L0), vlm=vlm)),
        Variant("vlm_dp_L0_large", f"VLM+DP, L0 with 2x PlaceNextTo, PlaceOnTop ({2 * n})",
                b.eval("eval_L0_large", "vlm_dp", tasks, dp=b.dp("dp_L0_large", large, L0), vlm=vlm)),
    ]
    layout = Layout(
        "Data scaling (Figure 4 right): VLM+DP success (%), DP trained on L0 or on L0 with 2x PlaceNextTo/PlaceOnTop",
        variants, [("", L0), ("L1, no new demonstrations", STACKING)],
        checks=[Check(f"larger minus base on {', '.join(ts)} (paper: positive)",
                      lambda r, ts=ts: difference(r.average("vlm_dp_L0_large", ts), r.average("vlm_dp_L0", ts)),
                      at_least=0.0) for ts in (DOUBLED, STACKING)],
        paper_source=FINDINGS["data_scaling"],
        notes=["The VLM is trained on L0 and L1 (PushToTarget, SingleStack, StackTopple) and is the same for both "
               "DPs; the DPs differ only in their data.",
               pacing_note(s)])
    return Experiment("data_scaling", b.stages, layout)


if __name__ == "__main__":
    run_experiment("data_scaling", build, SIZES, __doc__)
