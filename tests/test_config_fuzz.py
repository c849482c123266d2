"""Config fuzzing, generated from the schema: for every leaf key of `pipeline.schema.Config`, a value of the wrong
type, a value out of its range or choices, and a misspelt sibling key each stop in one line that names the key and
what is allowed, before any work (the stages' CLI turns that into exit 2: sampled through a real stage below)."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipeline import config, schema
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
COMPOSED = config.compose(["profile=smoke"])


def leaves(cls: type = schema.Config, prefix: str = "") -> list[tuple[str, type, dict]]:
    """(dotted key, type, constraint metadata) of every field the schema types, dataclass sections walked."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += leaves(kind, f"{prefix}{f.name}.")
        elif typing.get_origin(kind) is not dict:  # dicts of sections (data.files) and free-form (search.space)
            out.append((f"{prefix}{f.name}", kind, dict(f.metadata)))
    return out


LEAVES = leaves()


def base(kind: type) -> type:
    """The type under Optional[...]."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) is typing.Union else kind


def wrong_type(kind: type):
    kind = base(kind)
    if typing.get_origin(kind) is list:
        return {"not": "a list"}
    return {str: ["not", "a", "string"], bool: "perhaps", int: "many", float: "plenty"}[kind]


def out_of_range(meta: dict):
    if "choices" in meta:
        return "no_such_choice" if isinstance(meta["choices"][0], str) else -12345
    if "ge" in meta or "gt" in meta:
        return meta.get("ge", meta.get("gt")) - 1
    if "le" in meta or "lt" in meta:
        return meta.get("le", meta.get("lt")) + 1
    return None


def with_value(key: str, value) -> dict:
    raw = copy.deepcopy(COMPOSED)
    *parents, name = key.split(".")
    node = raw
    for parent in parents:
        node = node[parent]
    node[name] = value
    return raw


def with_misspelt(key: str) -> dict:
    raw = copy.deepcopy(COMPOSED)
    *parents, name = key.split(".")
    node = raw
    for parent in parents:
        node = node[parent]
    node[name + "x"] = node.pop(name)
    return raw


def one_line_naming(raw: dict, key: str) -> str:
    with pytest.raises(ConfigError) as err:
        config.validate(raw, source="params.yaml")
    message = str(err.value)
    assert "\n" not in message and key in message, message
    return message


def test_the_schema_has_the_leaves_the_fuzzing_walks():
    assert len(LEAVES) > 60 and {"cnn.train.lr", "data.augment.flip", "tuner.kind", "tracking.ui_port"} <= {
        key for key, _, _ in LEAVES}


@pytest.mark.parametrize("key, kind", [(k, t) for k, t, _ in LEAVES], ids=[k for k, _, _ in LEAVES])
def test_a_value_of_the_wrong_type_is_named(key, kind):
    message = one_line_naming(with_value(key, wrong_type(kind)), key)
    expected = ("could not be converted", "Cannot convert", "Invalid type", "must be a", "is not a valid")  # the type
    assert any(words in message for words in expected), message


RANGED = [(k, t, m) for k, t, m in LEAVES if out_of_range(m) is not None]


@pytest.mark.parametrize("key, kind, meta", RANGED, ids=[k for k, _, _ in RANGED])
def test_a_value_out_of_range_or_choices_is_named_with_what_is_allowed(key, kind, meta):
    value = out_of_range(meta)
    message = one_line_naming(with_value(key, [value] if typing.get_origin(base(kind)) is list else value), key)
    assert "choose one of" in message or "must be" in message, message


@pytest.mark.parametrize("key", [k for k, _, _ in LEAVES])
def test_a_misspelt_key_is_named_with_its_allowed_siblings(key):
    message = one_line_naming(with_misspelt(key), key + "x")
    assert "allowed: " in message and key.rsplit(".", 1)[-1] in message, message


@pytest.mark.slow
@pytest.mark.parametrize("override", ["cnn.train.lr=fast", "cnn.train.lr=-1", "+cnn.train.lrr=0.1"])
def test_a_stage_stops_with_exit_2_and_one_line_before_any_work(override, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.stages.cnn", "profile=smoke", override], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode == 2 and len(errors) == 1 and "cnn.train.lr" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not any(tmp_path.iterdir())  # nothing written: no work began
