"""OmegaConf configs: ``load_config(name, overrides)``.

Each entry point has one YAML file here (``data.yaml``, ``demo.yaml``, ...). A top-level
``env:`` section is filled from ``env.yaml`` first, so environment defaults live in one place.
Configs are in struct mode: a misspelt key is an error that lists the valid keys.

Overrides come as ``key=value`` dotlist items (``env.image_size=64``) or as the upper-case
make variables an entry point declares (``TASKS=PlaceOnTop`` -> ``tasks``).

Presets: a config with a top-level ``preset:`` key gets ``configs/<name>/<preset>.yaml``
merged over it before the overrides (``PRESET=paper`` picks ``configs/dp/paper.yaml``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent


from .errors import CheckpointError, ConfigError, MissingInputError, UserError  # noqa: F401

# Ranges of the counts and sizes, by dotted key, checked for every config that has the key
# (after the overrides): a negative count or an impossible size is an error before work starts.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "episodes": (1, None), "seed_start": (0, None), "workers": (0, None), "max_seeds_factor": (1, None),
    "max_steps": (0, None), "video_episodes": (0, None), "eval_episodes": (1, None),
    "rollout_episodes": (1, None), "rollout_every": (0, None), "vlm_steps": (1, None), "dp_steps": (1, None),
    "vlm_code_fraction": (0.05, 1.0), "data.code_fraction": (0.05, 1.0),
    "dp_val_every": (1, None), "frames_per_episode": (1, None), "seed": (0, None),
    "env.image_size": (16, 1024), "image_size": (16, 1024), "model.image_size": (16, 1024), "model.horizon": (1, 256),
    "n_action_steps": (1, 256), "data.batch_size": (1, None), "data.num_workers": (0, None),
    "data.val_fraction": (0, 0.9), "trainer.max_steps": (1, None), "trainer.val_check_interval": (1, None),
    "optim.lr": (0, None), "val_sample_batches": (0, None), "grounding": (0, None), "grid": (1, None),
    "negatives": (0, None),
    "rollout.episodes": (1, None), "rollout.every_n_val_epochs": (0, None), "rollout.workers": (0, None),
    "envs_per_worker": (1, None), "rollout.envs_per_worker": (1, None),
    "policy_options.n_action_steps": (0, 256), "policy_options.horizon": (0, 256),
    "policy_options.tracker_slack": (0.1, None), "policy_options.reissue_after": (0, None),
    "policy_options.confirm_line_end": (0, None),
}


def _valid_keys(cfg: DictConfig, dotted: str) -> list[str]:
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        if isinstance(node, DictConfig) and p in node:
            node = node[p]
        else:
            break
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def load_config(name: str, overrides: list[str] | None = None, aliases: dict[str, str] | None = None) -> DictConfig:
    """Load ``configs/<name>.yaml`` with ``env.yaml`` under ``env`` and apply overrides."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config {name!r}; configs: {known}")
    cfg = OmegaConf.load(path)
    if "env" in cfg:
        cfg = OmegaConf.merge({"env": OmegaConf.load(CONFIG_DIR / "env.yaml")}, cfg)
    dotlist = []
    aliases = aliases or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key in aliases:
            key = aliases[key]
        elif key.isupper():
            raise ConfigError(f"unknown variable {key}=; this command takes {sorted(aliases)} "
                              "or lower-case key=value overrides")
        dotlist.append(f"{key}={value}")
    if "preset" in cfg:
        for item in dotlist:
            if item.split("=", 1)[0] == "preset":
                cfg.preset = item.split("=", 1)[1]
        preset = _preset(name, str(cfg.preset))
        OmegaConf.set_struct(cfg, True)  # a preset may only set keys the base config has
        try:
            cfg = OmegaConf.merge(cfg, preset)
        except OmegaConfBaseException as e:
            raise ConfigError(f"preset {cfg.preset!r} of {name}: {str(e).splitlines()[0]}") from None
    OmegaConf.set_struct(cfg, True)
    for item in dotlist:
        key = item.split("=", 1)[0]
        node = cfg
        for part in key.split("."):
            if not isinstance(node, DictConfig) or part not in node:
                raise ConfigError(f"unknown config key {key!r} in {name}.yaml; valid keys here: "
                                  f"{sorted(node.keys()) if isinstance(node, DictConfig) else []}")
            node = node[part]
        old = OmegaConf.select(cfg, key, default=None)
        try:
            cfg.merge_with(OmegaConf.from_dotlist([item]))
        except (ConfigAttributeError, ConfigKeyError):
            raise ConfigError(f"unknown config key {key!r} in {name}.yaml; valid keys here: "
                              f"{_valid_keys(cfg, key)}") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad value for {key!r}: {str(e).splitlines()[0]}") from None
        new = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if isinstance(old, bool) and not isinstance(new, bool) and new in (0, 1):  # REPAIR=1
            OmegaConf.update(cfg, key, bool(new))
            continue
        _check_type(key, old, new)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve the config: {str(e).splitlines()[0]}") from None
    check_ranges(cfg, name)
    return cfg


def check_ranges(cfg: DictConfig, name: str = "config") -> None:
    """Raise :class:`ConfigError` for a value of ``RANGES`` outside its range."""
    for key, (low, high) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{key}={value} in {name}: must be {bounds}")


def _preset(name: str, preset: str) -> DictConfig:
    path = CONFIG_DIR / name / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / name).glob("*.yaml"))
        raise ConfigError(f"no preset {preset!r} for {name}; presets: {known}")
    return OmegaConf.load(path)


def _check_type(key: str, old, new) -> None:
    """Keep the YAML's scalar types: ``episodes=abc`` is an error, ``lr=1`` becomes 1.0."""
    if isinstance(old, DictConfig):
        if isinstance(new, DictConfig):
            return
        raise ConfigError(f"{key} is a section; set its keys ({sorted(old.keys())}) instead")
    if old is None or isinstance(old, list) or type(old) is type(new):
        return
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return
    if isinstance(old, str):  # strings accept anything that was typed (e.g. TASKS=L0)
        return
    raise ConfigError(f"{key}={new!r}: expected {type(old).__name__}, like the default {old!r}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def cli_config(name: str, argv: list[str], aliases: dict[str, str] | None = None) -> DictConfig:
    """Config for a command-line entry point (a bad override raises :class:`ConfigError`, which
    :func:`run_entry_point` reports)."""
    return load_config(name, argv, aliases)


def run_entry_point(main) -> None:
    """Run ``main(argv) -> exit status`` as the command (see :func:`entry_status`) and exit."""
    import sys

    sys.exit(entry_status(main, sys.argv[1:]))


def entry_status(main, argv: list[str]) -> int:
    """``main(argv)``'s exit status: a :class:`UserError` becomes one ``error: ...`` line on
    stderr and 2, Ctrl-C 130; other exceptions (bugs) propagate with their traceback."""
    import sys

    try:
        return int(main(argv) or 0)
    except UserError as e:
        message = str(e).strip().splitlines()
        print(f"error: {message[0] if message else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished work is kept, and the same command resumes or redoes the rest",
              file=sys.stderr)
        return 130
