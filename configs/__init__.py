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


class ConfigError(ValueError):
    """A bad config name, key or value; the message says what is valid."""


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
        _check_type(key, old, OmegaConf.select(cfg, key, throw_on_resolution_failure=False))
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve the config: {str(e).splitlines()[0]}") from None
    return cfg


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
    """Config for a command-line entry point; a bad override exits with one clear error."""
    import sys

    try:
        return load_config(name, argv, aliases)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
