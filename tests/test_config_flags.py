"""Every flag or ``--set`` key that a config error names exists: a ``--flag`` of ``aegan train``
or a ``section.field`` of the run config, so a user told to fix it can."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from aegan_cli import main
from training import config

SOURCE = Path(config.__file__)


def named_flags() -> set[str]:
    """The first argument of every ``ConfigError(...)`` in training/config.py: literal strings,
    f-strings' literal parts (``f"loss.{name}"`` -> ``loss.``) and the strings of the tuples
    that loops over ``(flag, value, ...)`` take them from."""
    tree = ast.parse(SOURCE.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigError":
            first = node.args[0]
            if isinstance(first, ast.Constant):
                found.add(first.value)
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            for item in node.iter.elts:
                if isinstance(item, ast.Tuple) and isinstance(item.elts[0], ast.Constant):
                    found.add(item.elts[0].value)
    found |= {config.flag_of(section, name) for section, name in fields_of_sections()}
    return {f for f in found if isinstance(f, str) and (f.startswith("--") or "." in f)}


def fields_of_sections() -> list[tuple[str, str]]:
    return [
        (section, f.name)
        for section in config.SECTIONS
        for f in dataclasses.fields(getattr(config.RunConfig(), section))
    ]


def real_flags() -> set[str]:
    options = {opt for p in main.commands["train"].params for opt in getattr(p, "opts", [])}
    keys = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(config.RunConfig)
        if section.name != "preset"  # the other fields are the sections
        for f in dataclasses.fields(getattr(config.RunConfig(), section.name))
    }
    return options | keys


def test_every_named_flag_exists():
    named = named_flags()
    assert {"--steps", "--batch-size", "optim.lr_g", "model.hidden", "--image-size"} <= named
    assert named - real_flags() == set()


def test_the_check_sees_a_flag_that_does_not_exist():
    assert "--hidden" not in real_flags() and "--lr" not in real_flags()
    assert "train.no_such_field" not in real_flags()


def test_each_flag_of_a_field_is_the_option_that_sets_it():
    params = {opt: p.name for p in main.commands["train"].params for opt in getattr(p, "opts", [])}
    for (section, name), flag in config.CLI_FLAGS.items():
        assert params[flag] in (name, "source" if name == "source" else name), (section, name)
    assert set(config.SECTIONS) == {
        f.name for f in dataclasses.fields(config.RunConfig) if f.name != "preset"
    }
