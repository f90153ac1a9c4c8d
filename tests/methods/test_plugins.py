"""Methods of other packages, found through the ``look.methods`` entry-point group."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import pytest

from look.config import ConfigError
from look.methods import ENTRY_POINT_GROUP, get_method_class
from look.methods.ce import CrossEntropy
from tests.engine.test_trainer import tiny_config


class PluginCE(CrossEntropy):
    """CE as another package would register it."""

    name = "plugin_ce"


def _entry_points(*entries: tuple[str, str]) -> object:
    points = [importlib.metadata.EntryPoint(n, v, ENTRY_POINT_GROUP) for n, v in entries]
    return lambda group=None, name=None: [
        p for p in points if group in (None, p.group) and name in (None, p.name)
    ]


def test_an_installed_package_can_register_a_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from look.cli import main
    from look.engine.trainer import Trainer

    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        _entry_points(("plugin_ce", "tests.methods.test_plugins:PluginCE")),
    )
    assert get_method_class("plugin_ce") is PluginCE
    plan = Trainer(tiny_config("method={name: plugin_ce}"), tmp_path / "run").plan()
    assert plan["method"]["name"] == "plugin_ce"
    assert main(["methods"]) == 0
    assert "plugin_ce: " in capsys.readouterr().out


def test_a_broken_registration_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def registered(*entries: tuple[str, str]) -> None:
        monkeypatch.setattr(importlib.metadata, "entry_points", _entry_points(*entries))

    registered(("broken", "tests.methods.no_such_module:Method"))
    with pytest.raises(ConfigError, match=r"'broken' registered by entry point .* cannot be"):
        get_method_class("broken")
    with pytest.raises(
        ConfigError, match=r"unknown method 'anything'.*could not be loaded.*'broken'"
    ):
        get_method_class("anything")
    registered(("odd", "pathlib:Path"))
    with pytest.raises(ConfigError, match=r"is not a look\.methods\.Method"):
        get_method_class("odd")
    registered()
    with pytest.raises(ConfigError, match="unknown method 'simclr'"):
        get_method_class("simclr")
    assert get_method_class("look").name == "look"  # built-ins never read the entry points


class Unnamed(CrossEntropy):
    """A plug-in that forgot its name: runs recorded it as its parent's."""


class WithoutOptions(CrossEntropy):
    name = "without_options"
    Options = object  # type: ignore[assignment]


@dataclasses.dataclass
class _RequiredOptions:
    alpha: float


class WithARequiredOption(CrossEntropy):
    name = "required"
    Options = _RequiredOptions  # type: ignore[assignment]


def test_a_plugin_is_checked_when_it_is_loaded_and_a_broken_one_stops_no_other(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from look.cli import main

    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        _entry_points(
            ("unnamed", "tests.methods.test_plugins:Unnamed"),
            ("without_options", "tests.methods.test_plugins:WithoutOptions"),
            ("missing", "no_such_package.methods:X"),
            ("plugin_ce", "tests.methods.test_plugins:PluginCE"),
            ("required", "tests.methods.test_plugins:WithARequiredOption"),
        ),
    )
    with pytest.raises(ConfigError, match="has name 'ce' but is registered as 'unnamed'"):
        get_method_class("unnamed")
    with pytest.raises(ConfigError, match=r"'without_options'.*has no Options dataclass"):
        get_method_class("without_options")
    assert get_method_class("plugin_ce") is PluginCE, "another plug-in's breakage stops it not"
    with pytest.raises(ConfigError, match=r"'method\(required\)\.alpha' must be given"):
        WithARequiredOption.parse_options({"name": "required"})
    assert main(["methods"]) == 0
    captured = capsys.readouterr()
    assert "plugin_ce: CE as another package would register it." in captured.out
    assert "look: warning: method 'missing' registered by entry point" in captured.err
