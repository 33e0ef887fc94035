"""Every command answers --help; the configuration table covers every variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.config import VARIABLES, ConfigError, Settings

EXE = str(Path(sys.executable).with_name("persona-sync"))
COMMANDS = ["dev", "web", "worker", "cron", "status", "forget", "resume", "config"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    out = subprocess.run([EXE, *([command] if command else []), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "usage: persona-sync" in out.stdout


def test_config_table_lists_every_variable() -> None:
    out = subprocess.run([EXE, "config"], capture_output=True, text=True, timeout=60).stdout
    for name, _, _ in VARIABLES:
        assert f"`{name}`" in out


def test_bad_configuration_says_what_to_fix() -> None:
    with pytest.raises(ConfigError, match="DEDUPE_WINDOW"):
        Settings.from_env({"DEDUPE_WINDOW": "forever"})
    with pytest.raises(ConfigError, match="SPACE_ID"):
        Settings.from_env({"SPACE_ID": "{bad}"})
    s = Settings.from_env({"DEDUPE_WINDOW": "2h", "SEGMENT_WRITE_KEYS": "a, b=spa_2", "IDENTITY_LIMITS": "email:2"})
    assert s.dedupe_window == 7200 and dict(s.write_keys) == {"a": "default", "b": "spa_2"}
    assert s.identity_limits == {"user_id": 1, "*": 5, "email": 2}
    out = subprocess.run([EXE, "status"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "DEDUPE_WINDOW": "x"})
    assert out.returncode == 2 and "DEDUPE_WINDOW" in out.stderr
