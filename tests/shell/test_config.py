"""Configuration precedence and validation (no servers needed)."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from lakelet import config as c


def test_dataclass_defaults_match_the_shipped_file() -> None:
    # An installed (non-editable) Lakelet has no configs/ dir: the dataclass must say the same.
    shipped = tomllib.loads(c.REPO_DEFAULTS.read_text())
    flat = {k: v for table in shipped.values() for k, v in table.items()}
    defaults = c.Config()
    assert set(flat) == {f.name for f in fields(c.Config)}
    for name, value in flat.items():
        got = getattr(defaults, name)
        assert (got == Path(value) if isinstance(got, Path) else got == value), name


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "l.toml"
    f.write_text('[compute]\nsuspend_timeout = 42\nmax_cu = 4\n[proxy]\nlisten = "127.0.0.1:7000"\n')
    env = {"LAKELET_SUSPEND_TIMEOUT": "17", "LAKELET_LISTEN": "127.0.0.1:7001"}
    conf = c.load(f, {"listen": "127.0.0.1:7002", "min_cu": None}, env=env)
    assert conf.listen == "127.0.0.1:7002"  # flag
    assert conf.suspend_timeout == 17  # env beats file
    assert conf.max_cu == 4  # file beats defaults
    assert conf.min_cu == 0.25  # default kept when the flag is unset


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[compute]\nsuspend_timeout = 0.5\n", "at least 1 second"),
        ("[compute]\nmin_cu = 4\nmax_cu = 1\n", "above max_cu"),
        ("[compute]\ndurability = 'maybe'\n", "durability"),
        ("[proxy]\nsuspend_timeout = 3\n", "belongs in [compute]"),
        ("[proxy]\nlisten = 'nowhere'\n", "HOST:PORT"),
        ("[storage]\nretention_days = 90\n", "between 0 and 35"),
        ("[compute\n", "not valid TOML"),
    ],
)
def test_bad_settings_are_one_clear_line(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(c.ConfigError) as err:
        c.load(f, env={})
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(c.ConfigError, match="LAKELET_WAKE_TIMEOUT"):
        c.load(None, env={"LAKELET_WAKE_TIMEOUT": "soon"})


def test_missing_config_file() -> None:
    with pytest.raises(c.ConfigError, match="does not exist"):
        c.load(Path("/nonexistent/lakelet.toml"), env={})
