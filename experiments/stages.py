"""What an experiment runs: :class:`Stage` s, their cache keys, the settings of a preset, and the
:class:`Builder` that makes the stages of ``make data``, ``make train-vlm``, ``make train-dp``,
``make relabel-dp`` and ``make eval`` with a preset's arguments and their projected times.

A stage's key is a hash of its kind, its arguments, the defaults its script starts from (the
script's ``configs/<name>.yaml`` with its preset and ``env.yaml``, comments aside) and the keys of
the stages it reads, so a changed setting, on the command line or in a config file, changes the
keys of exactly the stages that depend on it (the runner reruns those).
Arguments that do not change a result (``WORKERS=``, ``ENVS_PER_WORKER=``) are a stage's
``options`` and are not hashed. Projected times come from :data:`COSTS`, per-unit costs measured on
the 2-core CPU machine; they do not apply to the paper preset's GPU runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from configs.errors import ConfigError

SCRIPTS = {"data": "generate_data.py", "train_vlm": "train_vlm.py", "train_dp": "train_dp.py",
           "relabel": "relabel_dp.py", "eval": "evaluate.py"}
CONFIGS = {"data": "data", "train_vlm": "vlm", "train_dp": "dp", "relabel": "relabel", "eval": "eval"}
TRAININGS = ("train_vlm", "train_dp")  # one thread each: may run side by side

# Per-unit costs in seconds on the 2-core CPU machine (one thread per process, measured in
# sessions 4-7 with another job beside it; README): estimates for projections only.
COSTS = {
    "startup": 25.0,             # per command: imports, model loading, spawning workers
    "data_episode": 0.15,        # per episode and worker, plus data_step per oracle step
    "data_step": 0.009,
    "train_dp_step": 0.25,       # cpu preset state DP, batch 64: about 4 steps/s
    "train_dp_step_rgb": 0.45,   # cpu_rgb image DP: 6000 steps in 38 min alone with two threads (session 33),
                                 # x 1.2 side by side as for the state DP; an estimate, not measured side by side
    "train_vlm_step": 0.6,       # cpu preset tiny LLaVA beside a DP: 0.34-0.65 s per step in the runs of
                                 # sessions 9-36 (the 2-task VLM of Figure 6 0.34, Swap 0.55, Table 1 0.65)
    "relabel_step": 0.012,       # one VLM query per data step (early stopping, prefix cache)
    "eval_step": {"oracle": 0.008, "flat_dp": 0.015, "vlm_oracle": 0.02, "vlm_dp": 0.035, "dp_oracle": 0.035},
}
# Oracle episode lengths (steps, mean of 3 seeds at 64 px) and the share of an evaluation episode
# assumed to fail at the step cap, for the projections.
ORACLE_STEPS = {"PlaceOnTop": 35, "PlaceNextTo": 37, "Push": 31, "Topple": 25, "PushToTarget": 40,
                "SingleStack": 72, "StackTopple": 84, "Pick": 20, "ReverseStack": 131, "NovelNoun": 35,
                "Swap": 125}
EVAL_FAILURE_SHARE = 0.5


# ---------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    """One step of an experiment: ``kind`` (a key of :data:`SCRIPTS`) run with ``args`` (the
    script's ``NAME=value`` / ``key=value`` arguments that decide its result: hashed) and
    ``options`` (arguments that do not, e.g. ``WORKERS``: not hashed). ``inputs`` maps an argument
    to ``(stage name, path inside that stage's folder)``, e.g. ``{"DATA": ("data", "")}``.
    A data stage may have ``args["EPISODES"]`` as a dict task -> count (one command per count).
    ``estimate``: projected seconds."""

    name: str
    kind: str
    args: dict
    inputs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    estimate: float = 0.0


def config_defaults(kind: str, preset: str | None = None) -> dict:
    """The defaults the script of ``kind`` starts from: its config with ``preset`` merged in, as a
    plain dict (interpolations unresolved; YAML comments do not count)."""
    from omegaconf import OmegaConf

    from configs import load_config

    return OmegaConf.to_container(load_config(CONFIGS[kind], [f"preset={preset}"] if preset else []))


# Config options added after stages were cached, each with the value that reproduces what the
# scripts did before the option existed. At that value an option is left out of a stage's key, so
# adding it does not orphan finished stages (``resnet_maxpool`` did, in session 11: every DP stage's
# key changed, and the state DPs, which have no ResNet, were renamed by hand); another value changes
# the key as any setting does. Add an option here only when that value really changes nothing.
KEY_NEUTRAL = {"data": {"oracle_travel_height": [0.12, 0.12]},
               "train_dp": {"model.resnet_maxpool": True, "model.aux_object_weight": 0.0, "model.image_film": False,
                            "model.object_keypoint_weight": 0.0,
                            "model.keypoint_memory_names": False, "model.keypoint_table_resting_only": False,
                            "model.keypoint_peak_window": 0, "model.random_shift": False,
                            "model.keypoint_table_map": "learned", "model.keypoint_targets": False,
                            "model.keypoint_target_hold": False, "model.keypoint_target_teacher": 0.0,
                            "execution.line_end_check": "tail", "execution.max_line_steps": 100,
                            "execution.snap_holds": False},
               "eval": {"policy_options.line_end_check": None, "policy_options.max_line_steps": None,
                        "policy_options.hold_threshold": 0.05, "policy_options.snap_holds": None}}


def _without_neutral(kind: str, defaults: dict) -> dict:
    """``defaults`` (a fresh :func:`config_defaults` dict, changed in place) less the
    :data:`KEY_NEUTRAL` options of ``kind`` that have their neutral value."""
    for dotted, value in KEY_NEUTRAL.get(kind, {}).items():
        *parents, leaf = dotted.split(".")
        path = [defaults]
        for p in parents:
            path.append(path[-1].get(p) if isinstance(path[-1].get(p), dict) else {})
        if leaf in path[-1] and path[-1][leaf] == value:
            del path[-1][leaf]
            for parent, name, node in reversed(list(zip(path, parents, path[1:]))):
                if node:
                    break
                del parent[name]  # a section of neutral options only (``execution``) goes with them
    return defaults


def _neutral_args(kind: str, args: dict) -> dict:
    """``args`` less the command-line overrides that set a :data:`KEY_NEUTRAL` option to its neutral value."""
    neutral = KEY_NEUTRAL.get(kind, {})
    return {k: v for k, v in args.items() if not (k in neutral and str(v).lower() == str(neutral[k]).lower())}


def stage_keys(stages: list[Stage]) -> dict[str, str]:
    """name -> 10-hex-digit key: hash of kind, args, the script's config defaults
    (:func:`config_defaults`, less the :data:`KEY_NEUTRAL` options at their neutral value) and the
    keys of the stages it reads."""
    keys: dict[str, str] = {}
    defaults: dict[tuple, dict] = {}
    for s in stages:
        for dep, _ in s.inputs.values():
            if dep not in keys:
                raise ValueError(f"stage {s.name} reads {dep!r}, which is not an earlier stage")
        which = (s.kind, s.args.get("PRESET"))
        if which not in defaults:
            defaults[which] = _without_neutral(s.kind, config_defaults(*which))
        blob = {"kind": s.kind, "args": _neutral_args(s.kind, s.args), "defaults": defaults[which],
                "inputs": {arg: [keys[dep], sub] for arg, (dep, sub) in s.inputs.items()}}
        keys[s.name] = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]
    return keys


# ---------------------------------------------------------------------------- building stages
class Builder:
    """Makes the stages of an experiment with the preset's arguments and projected times.

    ``sizes``: the experiment's settings (:func:`settings`); each method returns the stage name."""

    def __init__(self, preset: str, quick: bool, sizes: dict):
        self.preset, self.quick, self.s = preset, quick, sizes
        self.stages: list[Stage] = []

    def _add(self, stage: Stage) -> str:
        if any(s.name == stage.name for s in self.stages):
            raise ValueError(f"two stages named {stage.name}")
        self.stages.append(stage)
        return stage.name

    def data(self, name: str, tasks: list[str], episodes: int | dict, *, vlm: str | None = None,
             seed_start: int = 0) -> str:
        """Demonstrations (``make data``): the oracle's, or VLM+Oracle's when ``vlm`` names a VLM stage."""
        counts = episodes if isinstance(episodes, dict) else {t: int(episodes) for t in tasks}
        args = {"TASKS": ",".join(tasks), "EPISODES": counts if isinstance(episodes, dict) else int(episodes),
                "SEED_START": seed_start, "env.image_size": self.s["image_size"]}
        inputs = {}
        per_step, workers = COSTS["data_step"], self.s["workers"]
        if vlm is None:  # per-seed skill speed, travel height (make data); VLM+Oracle runs the skills as scripted
            args.update({n: self.s[n] for n, as_scripted in VARIATIONS.items() if self.s[n] != as_scripted})
        else:  # each worker holds a VLM (on the GPU if there is one): as many as evaluate
            args.update(POLICY="vlm_oracle", max_seeds_factor=5)
            inputs["VLM"] = (vlm, "export")
            per_step, workers = 2 * per_step, max(1, int(self.s["eval_workers"]))  # VLM queries, failed seeds
        seconds = sum(n * (COSTS["data_episode"] + per_step * ORACLE_STEPS.get(t, 60)) for t, n in counts.items())
        commands = len(set(counts.values())) if isinstance(episodes, dict) else 1
        return self._add(Stage(name, "data", args, inputs, {"WORKERS": workers},
                               commands * COSTS["startup"] + seconds / max(1, min(int(workers), 2))))

    def vlm(self, name: str, data: str, tasks: list[str], steps: int | None = None) -> str:
        """The code VLM (``make train-vlm``) on ``tasks`` of the data stage ``data``."""
        steps = int(steps or self.s["vlm_steps"])
        args = {"DATASET": ",".join(tasks), "PRESET": self.preset, "STEPS": steps,
                "trainer.val_check_interval": max(1, min(int(self.s["vlm_val_every"]), steps))}
        return self._add(Stage(name, "train_vlm", args, {"DATA": (data, "")}, {},
                               COSTS["startup"] + steps * COSTS["train_vlm_step"]))

    def dp(self, name: str, data: str, tasks: list[str], conditioning: str = "code", steps: int | None = None,
           data_path: str = "", **extra) -> str:
        """A diffusion policy (``make train-dp``) on ``tasks`` of ``data`` (a data or relabel stage)."""
        steps = int(steps or self.s["dp_steps"])
        preset = self.s["dp_preset"]
        args = {"DATASET": ",".join(tasks), "PRESET": preset, "CONDITIONING": conditioning,
                "trainer.max_steps": steps, "trainer.val_check_interval": max(1, min(int(self.s["dp_val_every"]), steps)),
                "model.image_size": self.s["image_size"], **extra}
        if int(self.s["dp_seed"]):  # 0: make train-dp's default seed, left out of the arguments (and the key)
            args["seed"] = int(self.s["dp_seed"])
        if self.preset == "cpu":
            args["data.num_workers"] = 0  # one core per training (two train side by side)
        if self.quick:
            args.update({"data.batch_size": 8, "val_sample_batches": 1})
        return self._add(Stage(name, "train_dp", args, {"DATA": (data, data_path)}, {},
                               COSTS["startup"] + steps * COSTS["train_dp_step_rgb" if preset == "cpu_rgb"
                                                                else "train_dp_step"]))

    def relabel(self, name: str, data: str, tasks: list[str], vlm: str) -> str:
        """A copy of ``data`` with ``labels/vlm`` written by the VLM (``make relabel-dp``); DPs read
        it at the sub-path ``data`` of this stage."""
        args = {"DATASET": ",".join(tasks), "device": "cuda" if self.preset == "paper" else "cpu"}
        counts = next(st for st in self.stages if st.name == data).args["EPISODES"]
        steps = sum((counts[t] if isinstance(counts, dict) else counts) * ORACLE_STEPS.get(t, 60) for t in tasks)
        return self._add(Stage(name, "relabel", args, {"DATA": (data, ""), "VLM": (vlm, "export")}, {},
                               COSTS["startup"] + steps * COSTS["relabel_step"]))

    def eval(self, name: str, policy: str, tasks: list[str], *, dp: str | None = None, vlm: str | None = None,
             **options) -> str:
        """An evaluation (``make eval``) of ``policy`` on ``tasks``; ``options``: its NAME=value extras."""
        import envs

        episodes = int(self.s["eval_episodes"])
        args = {"POLICY": policy, "TASKS": ",".join(tasks), "EPISODES": episodes, "MAX_STEPS": self.s["eval_max_steps"],
                **options}
        if policy == "vlm_dp":
            args.setdefault("QUERY_EVERY_STEP", str(bool(self.s["query_every_step"])).lower())
            if args["QUERY_EVERY_STEP"] == "false" and int(self.s["confirm_line_end"]):  # acts only when paced
                args.setdefault("CONFIRM_LINE_END", int(self.s["confirm_line_end"]))
        inputs = {}
        if dp:
            inputs["DP"] = (dp, "policy.pt")
        if vlm:
            inputs["VLM"] = (vlm, "export")
        steps = 0.0
        for t in tasks:
            cap = int(self.s["eval_max_steps"]) or envs.TASKS[t].max_steps
            steps += episodes * ((1 - EVAL_FAILURE_SHARE) * min(1.5 * ORACLE_STEPS.get(t, 60), cap)
                                 + EVAL_FAILURE_SHARE * cap)
        seconds = steps * COSTS["eval_step"][policy] / (0.8 * max(1, min(int(self.s["eval_workers"]), 2)))
        return self._add(Stage(name, "eval", args, inputs,
                               {"WORKERS": self.s["eval_workers"], "ENVS_PER_WORKER": self.s["envs_per_worker"],
                                "video_episodes": self.s["video_episodes"]},
                               COSTS["startup"] + seconds))


# ---------------------------------------------------------------------------- settings
# Settings every experiment has, per preset; an experiment adds its own sizes (its SIZES).
# workers: data-generation processes; eval_workers, envs_per_worker: make eval's WORKERS, ENVS_PER_WORKER
# (paper: one process stepping 8 environments, its models once on the GPU). oracle_speed: make data's
# per-seed speed range of the oracle's skills (cpu: [0.6,1.0], which lifted DP+Oracle Push from 24 to
# 30 of 32 on L0, README; the paper's oracle runs at one speed). confirm_line_end: make eval's
# CONFIRM_LINE_END for DP-paced VLM+DP evaluations (off: it lifted VLM+DP on L0 from 82.0 to 91.4 % with
# a 13000-step DP, but lowered the demo's 5000-step DP from 59.4 to 34.4 %, README; not in the paper).
# dp_preset: the DPs' PRESET (configs/dp/<name>.yaml; cpu_rgb: the image DP at CPU size).
# oracle_travel_height: make data's per-seed range of the oracle's lowest travel height (m).
# dp_seed: every DP's training seed (make train-dp's seed): another training of the same DPs, with the data
# and VLMs cached, for the spread between trainings.
COMMON = {
    "cpu": {"image_size": 64, "workers": 2, "eval_workers": 2, "envs_per_worker": 1, "eval_episodes": 32,
            "eval_max_steps": 0, "video_episodes": 1, "dp_val_every": 500, "vlm_val_every": 250,
            "query_every_step": False, "oracle_speed": "[0.6,1.0]", "confirm_line_end": 0, "dp_preset": "cpu",
            "oracle_travel_height": "[0.12,0.12]", "dp_seed": 0},
    "paper": {"image_size": 128, "workers": 8, "eval_workers": 1, "envs_per_worker": 8, "eval_episodes": 64,
              "eval_max_steps": 0, "video_episodes": 1, "dp_val_every": 5000, "vlm_val_every": 1000,
              "query_every_step": True, "oracle_speed": "[1.0,1.0]", "confirm_line_end": 0, "dp_preset": "paper",
              "oracle_travel_height": "[0.12,0.12]", "dp_seed": 0},
    "quick": {"image_size": 32, "workers": 1, "eval_workers": 0, "envs_per_worker": 1, "eval_episodes": 1,
              "eval_max_steps": 20, "video_episodes": 0, "dp_val_every": 5, "vlm_val_every": 6,
              "query_every_step": False, "oracle_speed": "[1.0,1.0]", "confirm_line_end": 0, "dp_preset": "cpu",
              "oracle_travel_height": "[0.12,0.12]", "dp_seed": 0},
}
# make data's per-seed ranges of the oracle (envs.oracle.ORACLE_VARIATIONS), each with its text when the
# range is the scripted value (then make data is not given it)
VARIATIONS = {"oracle_speed": "[1.0,1.0]", "oracle_travel_height": "[0.12,0.12]"}
# 0 is meaningful for these; other counts are >= 1
ZERO_OK = {"eval_max_steps", "video_episodes", "workers", "eval_workers", "confirm_line_end", "dp_seed"}


def settings(sizes: dict, preset: str, quick: bool, overrides: list[str]) -> dict:
    """The settings of a run: COMMON and the experiment's ``sizes`` for the preset (``quick``: its
    quick sizes), then ``name=value`` overrides (type-checked; raises :class:`ConfigError`)."""
    level = "quick" if quick else preset
    s = {**COMMON[level], **sizes[level]}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not an option or a name=value setting")
        key, value = item.split("=", 1)
        if key not in s:
            raise ConfigError(f"unknown setting {key!r}; settings: {sorted(s)}")
        old = s[key]
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"{key}={value!r}: expected true or false")
            s[key] = value.lower() in ("true", "1")
        elif isinstance(old, int):
            try:
                s[key] = int(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected an integer, like the default {old}") from None
            low = 0 if key in ZERO_OK else 1
            if s[key] < low:
                raise ConfigError(f"{key}={s[key]}: must be >= {low}")
        elif key in VARIATIONS:  # one text per range, so that "[0.12, 0.12]" is the default "[0.12,0.12]"
            from datamodules.generate import variation_range

            s[key] = "[{},{}]".format(*variation_range(key, value))
        else:
            s[key] = value
    from configs import CONFIG_DIR

    dp_presets = sorted(p.stem for p in (CONFIG_DIR / "dp").glob("*.yaml"))
    if s["dp_preset"] not in dp_presets:
        raise ConfigError(f"dp_preset={s['dp_preset']!r}: expected one of {dp_presets}")
    return s
