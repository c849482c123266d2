"""Search spaces as declared in YAML, next to each stage's settings, checked without training anything:

    search:
      enabled: true
      space:
        filters: {choice: [16, 32, 48]}
        lr: {float: [1.0e-4, 3.0e-3], log: true}          # a name of the section, or of its `train`
        dropout: {float: [0.1, 0.4], step: 0.05, when: {batch_norm: [false]}}   # only for some parents

`parse_space` checks a space when the config loads (`pipeline.config`), before any trial; `pipeline.tuning` turns
it into keras-tuner hyperparameters. A module of its own, light to import, so that loading the config does not
pull in the tuner and the fit loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

KINDS = ("int", "float", "choice")
OPTIONS = ("step", "log", "when")
SEARCHABLE = ("cnn", "transfer", "finetune")  # the config sections that have a search space


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # one of KINDS
    values: tuple  # (min, max) for int and float; the choices for choice
    step: float | None = None
    log: bool = False
    when: tuple[str, tuple] | None = None  # (parent name, parent values) for which this parameter exists


def tunable_names(section: Any) -> list[str]:
    """What a space may name: the section's own settings, then those of its `train` budget but its length, patience
    and seeds (how long and how often the final model trains, not what it is)."""
    own = [f.name for f in dataclasses.fields(section) if f.name not in ("train", "search")]
    return own + [f.name for f in dataclasses.fields(section.train) if f.name not in ("epochs", "patience", "seeds")]


def parse_space(space: dict[str, Any], key: str, allowed: Collection[str]) -> list[Param]:
    """Check a declared space and return its parameters; a ConfigError naming `key.<name>` otherwise."""
    params: dict[str, Param] = {}
    for name, spec in space.items():
        where = f"{key}.{name}"
        if name not in allowed:
            raise ConfigError(f"{where}: not a setting of this stage; searchable: {', '.join(allowed)}")
        if not isinstance(spec, dict) or len([k for k in spec if k in KINDS]) != 1:
            raise ConfigError(f"{where}: give exactly one of {', '.join(k + ': ...' for k in KINDS)}")
        if unknown := [k for k in spec if k not in (*KINDS, *OPTIONS)]:
            raise ConfigError(f"{where}: unknown option {unknown[0]!r}; allowed: {', '.join((*KINDS, *OPTIONS))}")
        kind = next(k for k in spec if k in KINDS)
        values, step, use_log = spec[kind], spec.get("step"), bool(spec.get("log", False))
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: choice needs a non-empty list of values")
            if len({type(v) for v in values}) > 1:
                raise ConfigError(f"{where}: choice values must share one type, got {values}")
        else:
            if not (isinstance(values, list) and len(values) == 2 and all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in values)):
                raise ConfigError(f"{where}: {kind} needs [min, max], got {values!r}")
            if kind == "int" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}: int needs whole numbers, got {values}")
            if values[0] > values[1]:
                raise ConfigError(f"{where}: min {values[0]} > max {values[1]}")
            if use_log and values[0] <= 0:
                raise ConfigError(f"{where}: log scale needs min > 0, got {values[0]}")
            if step is not None and (step <= 0 or use_log):
                raise ConfigError(f"{where}: step must be > 0 and cannot go with log: true")
        when = spec.get("when")
        if when is not None:
            if not (isinstance(when, dict) and len(when) == 1):
                raise ConfigError(f"{where}.when: give one parent, as {{parent: [values]}}")
            (parent, parent_values), = when.items()
            if parent not in params or params[parent].kind != "choice":
                raise ConfigError(f"{where}.when: {parent} must be a choice declared before {name}")
            parent_values = parent_values if isinstance(parent_values, list) else [parent_values]
            if bad := [v for v in parent_values if v not in params[parent].values]:
                raise ConfigError(f"{where}.when: {bad} not among {parent}'s choices {list(params[parent].values)}")
            when = (parent, tuple(parent_values))
        params[name] = Param(name, kind, tuple(values), step, use_log, when)
    return list(params.values())


def flat_key(key: str, section: Any, name: str) -> str:
    """A space's setting as a dotted config key: `cnn.dropout` (the section's own), `cnn.train.lr` (its budget's)."""
    return f"{key}.{name}" if name in {f.name for f in dataclasses.fields(section)} else f"{key}.train.{name}"


def space_keys(cfg: Any) -> set[str]:
    """The dotted keys of every setting a search space names, searched this time or not: the values a stage trains
    with for these are known only once it has read its search result."""
    return {flat_key(key, getattr(cfg, key), name) for key in SEARCHABLE for name in getattr(cfg, key).search.space}


def trained_values(key: str, section: Any) -> dict[str, Any]:
    """The values `section` trains with for the settings its space names, by dotted key."""
    return {flat_key(key, section, name): getattr(section if hasattr(section, name) else section.train, name)
            for name in section.search.space}
