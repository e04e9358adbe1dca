"""The run config's declared bounds (training/config.py: Count, Fraction, Rate, ... built from its
Ge, Gt, Le, Lt markers, and Literal choices on the fields): validate() enforces every one, naming
the flag or ``--set`` key, and admits the edge. Found by walking the declarations, so a new bound
is tested without listing it."""

from __future__ import annotations

import re
import types
import typing

import pytest

from training import config
from training.config import ConfigError, flag_of, from_preset, validate


def _declared(annotation):
    """(base type, metadata) of a field's annotation, through ``X | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is not type(None):
                return _declared(option)
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, extras
    return annotation, []


def cases() -> list[tuple[str, str, object, object]]:
    """(section, field, a value breaking a declaration, the value at its edge or None)."""
    found = []
    for section in config.SECTIONS:
        hints = typing.get_type_hints(
            type(getattr(config.RunConfig(), section)), include_extras=True
        )
        for name, annotation in hints.items():
            base, extras = _declared(annotation)
            step = 1 if base is int else 1e-9
            for bound in extras:
                if isinstance(bound, config.Ge):
                    found.append((section, name, bound.ge - step, bound.ge))
                elif isinstance(bound, config.Gt):
                    found.append((section, name, bound.gt, bound.gt + step))
                elif isinstance(bound, config.Le):
                    found.append((section, name, bound.le + step, bound.le))
                elif isinstance(bound, config.Lt):
                    found.append((section, name, bound.lt, bound.lt - step))
                elif isinstance(bound, config.Matches):
                    found.append((section, name, "nowhere", None))
            if typing.get_origin(base) is typing.Literal:
                found.append((section, name, "none of these", None))
    return found


@pytest.mark.parametrize(("section", "name", "bad", "edge"), cases(), ids=str)
def test_every_declared_bound_is_enforced_naming_its_flag(section, name, bad, edge):
    cfg = from_preset("tiny")
    setattr(getattr(cfg, section), name, bad)
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    assert caught.value.flag == flag_of(section, name)
    assert "must be" in str(caught.value)
    if edge is not None:
        cfg = from_preset("tiny")
        setattr(getattr(cfg, section), name, edge)
        if (section, name) == ("train", "log_every"):
            cfg.train.eval_every = 0  # a multiple of any log_every
        validate(cfg)


def test_the_walk_finds_the_bounds_it_should():
    found = {(s, n) for s, n, _, _ in cases()}
    assert len(found) >= 30
    assert {("train", "steps"), ("loss", "recon_share"), ("optim", "beta2")} <= found
    assert {("train", "device"), ("model", "arch"), ("data", "channels")} <= found


@pytest.mark.parametrize(
    ("section", "name", "value", "message"),
    [
        ("train", "steps", 0, "--steps: must be at least 1, not 0"),
        ("loss", "recon_share", 0.0, "loss.recon_share: must be in (0, 1], not 0.0"),
        ("optim", "beta1", 1.0, "optim.beta1: must be in [0, 1), not 1.0"),
        ("data", "channels", 2, "--channels: must be 1 or 3, not 2"),
        ("train", "device", "tpu", "--device: must be auto, cpu, cuda or cuda:N, not 'tpu'"),
        ("train", "threads", 0, "--threads: must be at least 1, not 0"),
    ],
)
def test_messages_read_as_a_user_needs_them(section, name, value, message):
    cfg = from_preset("tiny")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)
