"""The paper's experiments (experiments/*.py) on the shared runner: stage keys and scheduling, the
paper's numbers, bad input, and (slow) each experiment's --quick run end to end with the real
scripts, simulator and tiny models: its files, a rerun that trains nothing, a changed setting that
reruns only what depends on it, and a run killed in a training that resumes.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import ablate_chunking, dataset_generation, paper_results, swap, table1  # noqa: E402
from experiments.report import Layout, Results, Variant, csv_text, markdown_table  # noqa: E402
from experiments.runner import schedule_length, start_order  # noqa: E402
from experiments.stages import Builder, Stage, settings, stage_keys  # noqa: E402

EXPERIMENTS = ["table1", "swap", "data_scaling", "ablate_chunking", "dataset_generation"]


def run(name: str, *args: str, timeout: int = 1200, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, **kw)


def stages_of(module, preset: str = "cpu", quick: bool = False, *overrides: str) -> dict[str, str]:
    s = settings(module.SIZES, preset, quick, list(overrides))
    b = Builder(preset, quick, s)
    return stage_keys(module.build(b, s).stages)


# ---------------------------------------------------------------------------- fast
@pytest.mark.parametrize("preset, extra, says", [("cpu", [], "QUERY_EVERY_STEP=false"),
                                                  ("cpu", ["query_every_step=true"], "QUERY_EVERY_STEP=true"),
                                                  ("paper", [], "QUERY_EVERY_STEP=true")])
def test_the_pacing_note_says_how_this_run_paces_vlm_dp(preset, extra, says):
    for module in (table1, swap):
        s = settings(module.SIZES, preset, False, extra)
        notes = module.build(Builder(preset, False, s), s).layout.notes
        assert [n for n in notes if "QUERY_EVERY_STEP" in n] == [next(n for n in notes if says in n)]


def test_table1_transcription_matches_the_papers_averages():
    """The rows of Table 1 as transcribed average to the averages the paper prints (two of which
    the paper itself has off: VLM+DP L0 by 0.02, VLM+DP L1 by 0.50, kept as printed)."""
    tasks = paper_results.TABLE1_TASKS + paper_results.TABLE1_UNSEEN
    off = {"vlm_dp_L0": -0.02, "vlm_dp_L1": 0.50}
    for column, average in paper_results.TABLE1_AVERAGES.items():
        values = [paper_results.TABLE1[column][t] for t in tasks]
        assert abs(average - sum(values) / len(values) - off.get(column, 0.0)) < 0.006, column
    assert paper_results.TABLE1["vlm_oracle"] == {}  # empty in the paper's text, never invented


EVALS = ["eval_regenerate", "eval_full_chunk", "eval_half_horizon", "eval_regenerate_paced",
         "eval_full_chunk_paced", "eval_half_horizon_paced"]  # ablate_chunking's evaluation stages


@pytest.fixture
def copied_configs(tmp_path, monkeypatch):
    """(today's ablate_chunking stage keys, a copy of configs/ that the stage keys now read)."""
    import configs

    base = stages_of(ablate_chunking, "cpu", False)
    copy = tmp_path / "configs"
    shutil.copytree(configs.CONFIG_DIR, copy)
    monkeypatch.setattr(configs, "CONFIG_DIR", copy)
    return base, copy


def changed_stages(base: dict) -> list[str]:
    changed = stages_of(ablate_chunking, "cpu", False)
    return sorted(n for n in base if base[n] != changed[n])


def test_a_changed_setting_changes_the_keys_of_the_stages_that_depend_on_it_only():
    base = stages_of(ablate_chunking, "cpu", False)
    more_eval = stages_of(ablate_chunking, "cpu", False, "eval_episodes=40")
    more_dp = stages_of(ablate_chunking, "cpu", False, "dp_steps=6000")
    workers = stages_of(ablate_chunking, "cpu", False, "workers=1")
    assert workers == base  # the number of processes does not change a result
    assert [n for n in base if base[n] != more_eval[n]] == EVALS
    assert [n for n in base if base[n] != more_dp[n]] == ["dp", *EVALS]
    assert stages_of(ablate_chunking, "paper")["data"] != base["data"]  # another preset: other data (image size)


def test_the_dp_preset_and_travel_height_settings_reach_their_stages_only():
    base = stages_of(swap, "cpu", False)
    rgb = settings(swap.SIZES, "cpu", False, ["dp_preset=cpu_rgb"])
    b = Builder("cpu", False, rgb)
    stages = swap.build(b, rgb).stages
    dps = [st for st in stages if st.kind == "train_dp"]
    assert dps and all(st.args["PRESET"] == "cpu_rgb" for st in dps)
    assert all(st.args["PRESET"] == "cpu" for st in stages if st.kind == "train_vlm")  # the VLMs keep the preset
    keys = stage_keys(stages)
    reads_a_dp = {st.name for st in stages if st.kind == "train_dp" or "DP" in st.inputs}
    assert {n for n in base if base[n] != keys[n]} == reads_a_dp and len(reads_a_dp) == 4 + 6
    varied = settings(swap.SIZES, "cpu", False, ["oracle_travel_height=[0.11,0.16]"])
    b = Builder("cpu", False, varied)
    height = stage_keys(swap.build(b, varied).stages)
    assert all(height[n] != base[n] for n in base)  # new demonstrations: everything downstream reruns
    assert next(st for st in b.stages if st.name == "data_small").args["oracle_travel_height"] == "[0.11,0.16]"


def test_dp_seed_retrains_the_dps_only_with_the_data_and_vlms_cached():
    base = settings(dataset_generation.SIZES, "cpu", False, [])
    b = Builder("cpu", False, base)
    stages = dataset_generation.build(b, base).stages
    assert not any("seed" in st.args for st in stages)  # the default seed is make train-dp's own
    again = settings(dataset_generation.SIZES, "cpu", False, ["dp_seed=1"])
    b = Builder("cpu", False, again)
    seeded = dataset_generation.build(b, again).stages
    assert [st.args.get("seed") for st in seeded if st.kind == "train_dp"] == [1] * 4
    keys, seeded_keys = stage_keys(stages), stage_keys(seeded)
    reads_a_dp = {st.name for st in stages if st.kind == "train_dp" or "DP" in st.inputs}
    assert {n for n in keys if keys[n] != seeded_keys[n]} == reads_a_dp and len(reads_a_dp) == 4 + 8


def test_a_range_setting_is_read_as_numbers_so_its_spellings_of_the_default_change_no_key():
    from envs.oracle import ORACLE_VARIATIONS
    from experiments.stages import COMMON, VARIATIONS

    assert VARIATIONS == {n: "[{0},{0}]".format(float(v["default"])) for n, v in ORACLE_VARIATIONS.items()}
    base = stages_of(swap, "cpu", False, "oracle_speed=[1.0,1.0]")
    for spelling in (["oracle_speed=[1, 1]", "oracle_travel_height=[0.12, 0.12]"], ["oracle_speed=[1.0,1.00]"]):
        assert stages_of(swap, "cpu", False, *spelling) == base
    s = settings(swap.SIZES, "cpu", False, ["oracle_speed=[0.6, 1]"])
    assert s["oracle_speed"] == COMMON["cpu"]["oracle_speed"] == "[0.6,1.0]"
    assert stages_of(swap, "cpu", False, "oracle_speed=[0.6, 1]") == stages_of(swap, "cpu", False)


@pytest.mark.parametrize("every_step, other, value", [(False, "_every_step", "true"), (True, "_paced", "false")])
def test_dataset_generation_evaluates_every_dp_under_both_pacings(every_step, other, value):
    s = settings(dataset_generation.SIZES, "cpu", False, [f"query_every_step={str(every_step).lower()}"])
    b = Builder("cpu", False, s)
    layout = dataset_generation.build(b, s).layout
    evals = {st.name: st.args["QUERY_EVERY_STEP"] for st in b.stages if st.kind == "eval"}
    dps = ["oracle", "shifted", "relabelled", "vlm_oracle_data"]
    assert evals == {**{f"eval_{d}": str(every_step).lower() for d in dps}, **{f"eval_{d}{other}": value for d in dps}}
    assert [v.id for v in layout.variants] == dps + [d + other for d in dps]
    assert len(layout.checks) == 6 and sum("VLM every step" in c.text for c in layout.checks) == 3


def test_a_changed_config_default_changes_the_keys_of_the_stages_that_depend_on_it_only(copied_configs):
    """Editing a preset file (here configs/dp/cpu.yaml's learning rate) reruns the DP and what reads
    it, not the data or the VLM; an edited comment reruns nothing."""
    base, copy = copied_configs
    preset = copy / "dp" / "cpu.yaml"
    preset.write_text("# an edited comment\n" + preset.read_text())
    assert stages_of(ablate_chunking, "cpu", False) == base
    preset.write_text(preset.read_text().replace("lr: 3.0e-4", "lr: 1.0e-4"))
    assert changed_stages(base) == sorted(["dp", *EVALS])


def test_an_option_added_at_its_neutral_value_keeps_the_keys_of_finished_stages(copied_configs):
    """configs/dp.yaml without ``model.resnet_maxpool`` (as before the option existed) gives the
    keys of today's configs, where it is true (stages.KEY_NEUTRAL); set to false it reruns the DP."""
    base, copy = copied_configs
    dp_yaml = copy / "dp.yaml"
    lines = dp_yaml.read_text().splitlines(keepends=True)
    assert sum("resnet_maxpool: true" in line for line in lines) == 1
    dp_yaml.write_text("".join(line for line in lines if "resnet_maxpool" not in line))
    assert stages_of(ablate_chunking, "cpu", False) == base
    dp_yaml.write_text("".join(lines).replace("resnet_maxpool: true", "resnet_maxpool: false"))
    assert changed_stages(base) == sorted(["dp", *EVALS])


@pytest.mark.parametrize("config, dropped, change, changed", [
    # configs/eval.yaml as before session 31; ``line_end_check: chunk`` reruns the evaluations only
    ("eval.yaml", ["policy_options.line_end_check", "policy_options.max_line_steps",
                   "policy_options.hold_threshold", "policy_options.snap_holds"],
     ("line_end_check: null", "line_end_check: chunk"), EVALS),
    # configs/dp.yaml without its ``execution`` section (before session 32), whose values are the
    # state preset's and neutral; ``snap_holds: true`` reruns the DP and its evaluations
    ("dp.yaml", ["execution"], ("snap_holds: false", "snap_holds: true"), ["dp", *EVALS]),
    # configs/data.yaml as before session 33; a varied travel height reruns every stage
    ("data.yaml", ["oracle_travel_height"],
     ("oracle_travel_height: [0.12, 0.12]", "oracle_travel_height: [0.11, 0.16]"), None),
])
def test_options_added_at_their_neutral_values_keep_the_keys_of_finished_stages(copied_configs, config, dropped,
                                                                                change, changed):
    """A config without options added later (stages.KEY_NEUTRAL) gives today's keys; another value
    of one of them reruns what depends on it (``changed``; None: everything)."""
    base, copy = copied_configs
    path = copy / config
    text = path.read_text()
    before = OmegaConf.load(path)
    for dotted in dropped:
        *parents, leaf = dotted.split(".")
        del (OmegaConf.select(before, ".".join(parents)) if parents else before)[leaf]
    OmegaConf.save(before, path)
    assert stages_of(ablate_chunking, "cpu", False) == base
    path.write_text(text.replace(*change))
    assert changed_stages(base) == sorted(changed or base)


def test_stage_keys_need_earlier_stages():
    with pytest.raises(ValueError, match="not an earlier stage"):
        stage_keys([Stage("dp", "train_dp", {}, {"DATA": ("data", "")})])


def test_schedule_pairs_trainings_and_runs_data_and_evaluations_alone():
    stages = [Stage("data", "data", {}), Stage("vlm", "train_vlm", {}, {"DATA": ("data", "")}),
              Stage("dp", "train_dp", {}, {"DATA": ("data", "")}),
              Stage("dp2", "train_dp", {}, {"DATA": ("data", "")}),
              Stage("eval", "eval", {}, {"DP": ("dp", ""), "VLM": ("vlm", "")})]
    d = {"data": 10, "vlm": 100, "dp": 60, "dp2": 60, "eval": 30}
    assert schedule_length(stages, d, jobs=1) == 10 + 100 + 60 + 60 + 30
    # vlm beside dp, then dp2 in dp's slot (beside the vlm's last 40), then the evaluation alone
    assert schedule_length(stages, d, jobs=2) == 10 + 120 + 30
    assert schedule_length(stages, d, jobs=2, done={"data", "vlm"}) == 60 + 30  # the two DPs side by side


def test_data_stages_start_first_wherever_they_are_listed():
    # listed as swap lists them: a size's data, its trainings, then the next size's data
    stages = [Stage("data_a", "data", {}), Stage("dp_a", "train_dp", {}, {"DATA": ("data_a", "")}),
              Stage("data_b", "data", {}), Stage("dp_b", "train_dp", {}, {"DATA": ("data_b", "")})]
    assert [s.name for s in start_order(stages)] == ["data_a", "data_b", "dp_a", "dp_b"]
    d = {"data_a": 10, "data_b": 20, "dp_a": 60, "dp_b": 60}
    # both datasets, then the two DPs side by side; in list order dp_a would start before data_b,
    # and data_b (which runs alone) would wait for it: 10 + 60 + 20 + 60
    assert schedule_length(stages, d, jobs=2) == 10 + 20 + 60


# Issue 12's budgets: 8 h for table1, 2 h for the others (swap measured 1:31 from nothing, session 36).
@pytest.mark.parametrize("name, limit_h", [("table1", 8), ("swap", 2), ("data_scaling", 2), ("ablate_chunking", 2),
                                           ("dataset_generation", 2)])
def test_dry_run_projects_the_cpu_preset_within_its_budget_and_writes_nothing(tmp_path, name, limit_h):
    out = tmp_path / "out"
    r = run(name, "--dry-run", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("projected time of what is left:"))
    h, m, s = (int(v) for v in line.split(":", 1)[1].split()[0].split(":"))
    assert 0 < h * 3600 + m * 60 + s <= limit_h * 3600, line
    assert "todo" in r.stdout and not out.exists()


@pytest.mark.parametrize("name, args, message", [
    ("table1", ["--preset", "gpu"], "invalid choice: 'gpu'"),
    ("table1", ["dp_steps=-3"], "dp_steps=-3: must be >= 1"),
    ("table1", ["dp_stepz=3"], "unknown setting 'dp_stepz'"),
    ("swap", ["small=many"], "small='many': expected an integer"),
    ("swap", ["--jobs", "0"], "--jobs 0: must be >= 1"),
    ("ablate_chunking", ["--quick", "--preset", "paper"], "--quick is the cpu preset"),
    ("data_scaling", ["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("dataset_generation", ["tasks=Nope"], "unknown task or level 'Nope'"),
    ("swap", ["--report"], "--report: no stage of this run has finished"),
    ("dataset_generation", ["dp_preset=cpu_rbg"], "dp_preset='cpu_rbg': expected one of ['cpu', 'cpu_rgb', 'paper']"),
    ("swap", ["oracle_speed=[1.0,0.6]"], "oracle_speed=[1.0, 0.6]: expected [lo, hi] with 0.2 <= lo <= hi <= 2.0"),
    ("swap", ["oracle_travel_height=0.12"], "oracle_travel_height=0.12: expected [lo, hi]"),
    ("swap", ["oracle_travel_height=[0.1,"], "oracle_travel_height=[0.1,: expected [lo, hi]"),
])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(tmp_path, name, args, message):
    out = tmp_path / "out"
    r = run(name, *args, "--out", str(out), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not out.exists()


def test_report_tables_put_the_papers_numbers_beside_ours():
    layout = Layout("t", [Variant("a", "A", "eval_a", {"Push": 50.0, "Topple": 70.0}), Variant("b", "B", "eval_b")],
                    [("", ["Push"]), ("Unseen", ["Topple"])], missing_paper="not in the text")
    results = Results(layout, {("a", "Push"): (3, 4), ("a", "Topple"): (1, 4), ("b", "Push"): (0, 4),
                               ("b", "Topple"): (2, 4)})
    md = markdown_table(results)
    assert "| task | A | paper | B | paper: not in the text |" in md
    assert "| Push | 75.0 (3/4) | 50.0 | 0.0 (0/4) |  |" in md
    assert "| *Unseen* |" in md
    assert "| **Average** | **50.0** | 60.0 | **25.0** |  |" in md
    rows = list(csv.DictReader(csv_text("x", results).splitlines()))
    assert rows[0] == {"experiment": "x", "variant": "a", "label": "A", "task": "Push", "successes": "3",
                       "episodes": "4", "rate": "0.7500", "paper_rate": "0.5000"}
    assert rows[2]["task"] == "average" and rows[2]["rate"] == "0.5000" and rows[2]["episodes"] == "8"
    assert rows[-1]["paper_rate"] == ""


# ---------------------------------------------------------------------------- slow: --quick runs
_QUICK: dict = {}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """name -> (output folder, first run's CompletedProcess, seconds): each --quick run made once."""
    def get(name: str):
        if name not in _QUICK:
            out = tmp_path_factory.mktemp("exp") / name
            t0 = time.time()
            r = run(name, "--quick", "--out", str(out))
            _QUICK[name] = (out, r, time.time() - t0)
        return _QUICK[name]

    return get


def stage_records(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/stage.json")}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_quick_run_writes_its_files_and_a_rerun_trains_nothing(quick, name):
    out, r, seconds = quick(name)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"{name} --quick: {seconds:.0f} s")
    for f in ("results.md", "results.csv", "results.png", "runs.log"):
        assert (out / f).is_file(), f
    assert list((out / "tb").glob("events.out.tfevents.*"))
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    cells = [row for row in rows if row["task"] != "average"]
    assert cells and all(int(row["episodes"]) >= 1 for row in cells)
    md = (out / "results.md").read_text()
    assert "| paper" in md and "## Time" in md
    if name == "table1":  # the paper's numbers stand beside ours
        cell = next(row for row in cells if row["variant"] == "dp_L0" and row["task"] == "PlaceNextTo")
        assert cell["paper_rate"] == "0.2190"
        assert "## Targets" in md and "VLM+DP (L0+L1) average minus flat DP (L0+L1) average" in md
    records, log = stage_records(out), (out / "runs.log").read_text()
    assert len(records) == len(log.splitlines()) > 0  # every stage ran once
    again = run(name, "--quick", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 stage(s) run" in again.stdout
    assert stage_records(out) == records and (out / "runs.log").read_text() == log


@pytest.mark.slow
def test_vlm_oracle_dataset_has_the_oracle_schema_and_the_vlms_lines(quick):
    """The dataset_generation run's VLM+Oracle data (make data POLICY=vlm_oracle): only successes,
    the same datasets as oracle data, labels that are the executed API lines."""
    from datamodules import schema
    from datamodules.labels import is_key_step
    from envs.skills import Interpreter

    out, r, _ = quick("dataset_generation")
    assert r.returncode == 0, r.stderr[-3000:]
    parser = Interpreter(api=None)
    (generated,) = (out / "stages").glob("data_vlm_oracle-*")
    (oracle,) = [p for p in (out / "stages").glob("data-*")]
    manifest = json.loads((generated / "manifest.json").read_text())
    assert manifest["generator"]["policy"] == "vlm_oracle"
    assert manifest["generator"]["vlm"].endswith("/export")

    def keys(group) -> set[str]:
        found = set()
        group.visititems(lambda name, obj: found.add(name))
        return found

    with schema.open_index(generated / "Topple.h5") as f, schema.open_index(oracle / "Topple.h5") as g:
        assert len(f["episodes"]) == 8
        reference = g["episodes"][next(iter(g["episodes"]))]
        for name in f["episodes"]:
            ep = f["episodes"][name]
            assert keys(ep) == keys(reference) and bool(ep.attrs["success"]) and ep["success"][-1]
            code = list(ep["labels/oracle/code"].asstr()[:])
            key = ep["labels/oracle/key_step"][:]
            assert len(code) == ep.attrs["num_steps"] == len(ep["actions"]) and key[0]
            assert [is_key_step(c) for c in code] == list(key)
            for line in (c for c, k in zip(code, key) if k):
                parser.parse(line)  # API code, as the VLM wrote and the skills ran it
            assert code[-1] == "done()"


@pytest.fixture
def chunking_copy(quick, tmp_path) -> Path:
    """A copy of the quick ablate_chunking run's folder, to rerun without touching the shared one."""
    out, r, _ = quick("ablate_chunking")
    assert r.returncode == 0, r.stderr[-3000:]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy


@pytest.mark.slow
def test_a_changed_setting_reruns_only_the_stages_that_depend_on_it(chunking_copy):
    copy = chunking_copy
    lines = len((copy / "runs.log").read_text().splitlines())
    again = run("ablate_chunking", "--quick", "--out", str(copy), "eval_episodes=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 stage(s) run, 3 cached" in again.stdout
    new = [line.split()[2] for line in (copy / "runs.log").read_text().splitlines()[lines:]]
    assert new == ["eval_regenerate", "eval_full_chunk", "eval_half_horizon", "eval_regenerate_paced",
                   "eval_full_chunk_paced", "eval_half_horizon_paced"]
    rows = list(csv.DictReader((copy / "results.csv").read_text().splitlines()))
    assert {row["episodes"] for row in rows if row["task"] != "average"} == {"2"}


@pytest.mark.slow
def test_a_run_killed_in_a_training_resumes_it_from_its_checkpoint(chunking_copy):
    copy = chunking_copy
    before = stage_records(copy)
    args = ["--quick", "--out", str(copy), "dp_steps=400", "dp_val_every=20"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "ablate_chunking.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    def new_checkpoint() -> bool:  # of the new DP (the copy holds the quick run's DP too)
        return any(p.parents[1].name not in before for p in (copy / "stages").glob("dp-*/checkpoints/last.ckpt"))

    deadline = time.time() + 600
    while time.time() < deadline and not new_checkpoint():
        assert proc.poll() is None, "the run ended before its DP wrote a checkpoint"
        time.sleep(0.2)
    time.sleep(1)  # the checkpoint file written whole
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its stage's process
    proc.wait()
    (dp,) = [p for p in (copy / "stages").glob("dp-*") if p.name not in before]
    assert not (dp / "stage.json").exists()
    log = (copy / "runs.log").read_text()
    report = run("ablate_chunking", *args, "--report")  # what the stopped run has: data and VLM, no evaluation
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    md = (copy / "results.md").read_text()
    assert "**Partial results** (`--report`): 2 of 9 stages finished; not yet: dp, eval_regenerate" in md
    assert "| dp | not finished |" in md and "| PlaceOnTop |  |" in md and "| **Average** |  |" in md  # none yet
    assert "dp_steps=400" in md and not list(csv.DictReader((copy / "results.csv").read_text().splitlines()))
    assert (copy / "runs.log").read_text() == log and stage_records(copy) == before  # nothing ran
    again = run("ablate_chunking", *args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "7 stage(s) run, 2 cached" in again.stdout  # data and VLM were kept
    after = stage_records(copy)
    assert {k: v for k, v in after.items() if k in before and k.startswith(("data-", "vlm-"))} == \
        {k: v for k, v in before.items() if k.startswith(("data-", "vlm-"))}
    log = (dp / "stage.log").read_text(errors="replace")
    assert log.count("train_dp.py") == 2 and "Restoring states from the checkpoint" in log
    assert json.loads((dp / "stage.json").read_text())["args"]["trainer.max_steps"] == 400
