"""OmegaConf config loader: struct mode, typed overrides, upper-case aliases, CLI errors."""

from __future__ import annotations

import pytest
from omegaconf import DictConfig, OmegaConf

from configs import CONFIG_DIR, RANGES, ConfigError, UserError, _check_type, cli_config, entry_status, load_config

DATA_ALIASES = {"TASKS": "tasks", "EPISODES": "episodes"}


def _yaml_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_load_data_config():
    cfg = load_config("data")
    assert isinstance(cfg, DictConfig)
    raw = OmegaConf.load(CONFIG_DIR / "data.yaml")
    for key in raw:
        if key != "env":
            assert cfg[key] == raw[key]
    assert OmegaConf.is_struct(cfg)


def test_env_section_merged_from_env_yaml():
    env = OmegaConf.load(CONFIG_DIR / "env.yaml")
    assert len(env) > 0
    cfg = load_config("data")
    assert OmegaConf.to_container(cfg.env) == OmegaConf.to_container(env)
    demo = load_config("demo")  # sets its own image size, inherits the rest
    assert demo.env.image_size == OmegaConf.load(CONFIG_DIR / "demo.yaml").env.image_size
    assert demo.env.backend == env.backend


def test_env_override():
    cfg = load_config("data", ["env.image_size=64"])
    assert cfg.env.image_size == 64
    assert cfg.env.backend == OmegaConf.load(CONFIG_DIR / "env.yaml").backend
    # The override does not leak into the next load.
    assert load_config("data").env.image_size == OmegaConf.load(CONFIG_DIR / "env.yaml").image_size
    assert OmegaConf.load(CONFIG_DIR / "env.yaml").image_size != 64


def test_plain_overrides_apply():
    cfg = load_config("data", ["episodes=7", "tasks=Swap", "out=/tmp/x"])
    assert (cfg.episodes, cfg.tasks, cfg.out) == (7, "Swap", "/tmp/x")


def test_misspelt_nested_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("data", ["env.imagesize=1"])
    msg = str(e.value)
    assert "env.imagesize" in msg
    assert "image_size" in msg and "backend" in msg


def test_misspelt_top_level_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("data", ["episode=3"])
    msg = str(e.value)
    assert "'episode'" in msg
    for key in ("episodes", "tasks", "workers", "env"):
        assert key in msg


@pytest.mark.parametrize("override", ["episodes=abc", "episodes=3.5", "episodes=true", "episodes=[1,2]",
                                      "env.image_size=big"])
def test_wrong_type_raises(override):
    with pytest.raises(ConfigError, match="expected int"):
        load_config("data", [override])


def test_check_type_int_into_float_and_bool_not():
    _check_type("lr", 0.1, 1)  # accepted
    with pytest.raises(ConfigError):
        _check_type("lr", 0.1, True)
    with pytest.raises(ConfigError):
        _check_type("lr", 0.1, "fast")


def test_unknown_upper_case_variable_names_aliases():
    with pytest.raises(ConfigError) as e:
        load_config("data", ["EPISODE=3"], aliases={"EPISODES": "episodes"})
    msg = str(e.value)
    assert "EPISODE=" in msg
    assert "['EPISODES']" in msg


def test_upper_case_without_aliases_is_rejected():
    with pytest.raises(ConfigError, match="EPISODES"):
        load_config("data", ["EPISODES=3"])


def test_alias_maps_to_key():
    cfg = load_config("data", ["EPISODES=4", "TASKS=PlaceOnTop"], aliases=DATA_ALIASES)
    assert cfg.episodes == 4
    assert isinstance(cfg.episodes, int)
    assert cfg.tasks == "PlaceOnTop"


def test_alias_value_is_type_checked():
    with pytest.raises(ConfigError, match="expected int"):
        load_config("data", ["EPISODES=many"], aliases=DATA_ALIASES)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("data", ["episodes"])


def test_unknown_config_name_lists_configs():
    with pytest.raises(ConfigError) as e:
        load_config("dta")
    msg = str(e.value)
    assert "'dta'" in msg
    for name in _yaml_names():
        assert name in msg


def test_cli_config_ok(capsys):
    cfg = cli_config("data", ["EPISODES=2"], DATA_ALIASES)
    assert cfg.episodes == 2
    assert capsys.readouterr().err == ""


def data_main(argv):
    cli_config("data", argv, {"EPISODES": "episodes"})
    return 0


@pytest.mark.parametrize("argv", [["env.imagesize=1"], ["episodes=abc"], ["EPISODE=3"], ["nokey"],
                                  ["EPISODES=-3"], ["episodes=0"], ["env.image_size=-5"], ["workers=-1"],
                                  ["seed_start=-1"], ["env.image_size=100000"]])
def test_cli_config_bad_override_exits_2(capsys, argv):
    assert entry_status(data_main, argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error:")
    assert captured.out == ""


def test_cli_config_unknown_name_exits_2(capsys):
    assert entry_status(lambda argv: cli_config("nope", argv), []) == 2
    assert capsys.readouterr().err.startswith("error: no config 'nope'")


def test_entry_status_reports_user_errors_and_keeps_bug_tracebacks(capsys):
    def user_error(argv):
        raise UserError("a bad thing\nsecond line")

    def bug(argv):
        raise ZeroDivisionError("a bug")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert entry_status(user_error, []) == 2
    assert capsys.readouterr().err == "error: a bad thing\n"
    with pytest.raises(ZeroDivisionError):
        entry_status(bug, [])
    assert entry_status(interrupted, []) == 130
    assert capsys.readouterr().err.startswith("error: interrupted")


def test_every_range_names_a_key_of_some_config():
    from omegaconf import OmegaConf

    configs = [load_config(p.stem) for p in CONFIG_DIR.glob("*.yaml") if p.stem != "env"]
    for key in RANGES:
        assert any(OmegaConf.select(c, key, default=None) is not None for c in configs), key


def test_ranges_accept_the_defaults_and_each_preset():
    for p in CONFIG_DIR.glob("*.yaml"):
        cfg = load_config(p.stem)  # raises ConfigError if a default were out of range
        for preset in (CONFIG_DIR / p.stem).glob("*.yaml"):
            load_config(p.stem, [f"preset={preset.stem}"])


# ---------------------------------------------------------------------------- former bugs
@pytest.mark.parametrize("override", ["out.x=1", "episodes.x=1", "env.image_size.x=1"])
def test_dotted_key_under_scalar_is_rejected(override):
    with pytest.raises(ConfigError):
        load_config("data", [override])


def test_section_replaced_by_scalar_is_rejected():
    with pytest.raises(ConfigError):
        load_config("data", ["env=abc"])


def test_cli_config_bad_value_prints_one_line(capsys):
    assert entry_status(data_main, ["env=[1,2]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert len(err.splitlines()) == 1, err


def test_cli_config_bad_interpolation_exits_2(capsys):
    assert entry_status(data_main, ["workers=${oops}"]) == 2


@pytest.mark.parametrize("name, override", [("demo", "vlm_code_fraction=0"), ("demo", "vlm_code_fraction=1.5"),
                                            ("vlm", "data.code_fraction=0")])
def test_code_fraction_out_of_range_is_a_config_error(name, override):
    """A zero share of code samples would leave the VLM nothing to learn code from; the demo used
    to find out only after generating its data."""
    with pytest.raises(ConfigError, match="code_fraction=.*must be in"):
        load_config(name, [override])
