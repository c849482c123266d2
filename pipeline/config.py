"""Load and validate the configuration every stage runs with.

Stages read `params.yaml` (what DVC tracks, composed from `conf/` by DVC's Hydra integration). Given
Hydra overrides (`python -m pipeline.stages.split data.val_size=0.2`), they compose `conf/` instead,
for ad-hoc runs outside DVC. Either way the result is checked against `pipeline.schema` and any
problem is raised as one `ConfigError` line naming the key and what is allowed.

`python -m pipeline.config` rewrites `params.yaml` from `conf/` (`make params`), through DVC's own
composition so the file is byte-for-byte what `dvc exp run` would write.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from pipeline.errors import ConfigError
from pipeline.files import atomic_path
from pipeline.schema import IDX_FILE_KEYS, Config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PARAMS_FILE = Path("params.yaml")


def compose(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """Compose `conf/` with Hydra overrides, as DVC does for `dvc exp run -S`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except HydraException as e:
        text = str(e).split("Config search path")[0]  # keep Hydra's message and its available options
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raise ConfigError(f"{conf_dir}: {' '.join(lines)}") from None
    return OmegaConf.to_container(cfg, resolve=True)


def load(path: Path = PARAMS_FILE, overrides: Sequence[str] = ()) -> Config:
    """The validated configuration: `params.yaml`, or `conf/` composed with `overrides` if any."""
    if overrides:
        raw, source = compose(overrides), "conf/ + overrides"
    else:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found; run `make params` to compose it from conf/") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = validate(raw, source=source)
    for key in overridden_search_keys(raw):
        section, name = key.split(".", 1)
        space = f"{section}.search.space.{name.removeprefix('train.')}"
        raise ConfigError(f"{source}: {key} is overridden, but the {section} search sets it ({space}): turn the "
                          f"search off ({section}.search.enabled=false) or take it out of the space (~{space})")
    return cfg


def overridden_search_keys(raw: dict[str, Any]) -> list[str]:
    """The keys an active search sets whose value differs from what `conf/` gives them, for the profile chosen
    and every option of the section's group: a `-S` override (or a hand edit of params.yaml) that the model
    would never see."""
    from pipeline.search_space import SEARCHABLE, flat_key

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), raw))  # raw is valid: validate ran
    stamp = tuple((str(path), path.stat().st_mtime_ns) for path in sorted(CONF_DIR.rglob("*.yaml")))
    overridden = []
    for section in SEARCHABLE:
        config = getattr(cfg, section)
        if not config.search.enabled:
            continue
        keys = [flat_key(section, config, name) for name in config.search.space]
        options = sorted(p.stem for p in (CONF_DIR / section).glob("*.yaml"))
        references = [_reference(raw["profile"], section, option, stamp) for option in options]
        overridden += [key for key in keys if all(_at(raw, key) != _at(ref, key) for ref in references)]
    return overridden


@functools.lru_cache(maxsize=32)
def _reference(profile: str, section: str, option: str, stamp: tuple) -> dict[str, Any]:
    """`conf/` composed for one option of a group, cached while `conf/` is unchanged (`stamp`: its files and their
    times): every load compares against the same few compositions, 0.4 s a load uncached."""
    return compose([f"profile={profile}", f"{section}={option}"])


def _at(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def validate(raw: Any, source: str = "config") -> Config:
    """Check `raw` (a plain dict) against the schema, its constraints and the cross-field rules."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    for message in _shape_errors(Config, raw, ""):
        raise ConfigError(f"{source}: {message}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: unknown key '{e.full_key}'{_allowed_keys(e)}") from None
    except MissingMandatoryValue as e:
        raise ConfigError(f"{source}: {e.full_key} is missing; set it in conf/") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e.full_key}: {str(e).splitlines()[0]}") from None
    for message in _constraint_errors(cfg, "") + _cross_field_errors(cfg):
        raise ConfigError(f"{source}: {message}")
    return cfg


def _shape_errors(cls: type, raw: dict, prefix: str) -> list[str]:
    """A section or a list where the schema has the other kind: OmegaConf's merge names no key for these."""
    errors, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in raw or raw[f.name] is None:
            continue
        kind, value, key = hints[f.name], raw[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                errors.append(f"{key} must be a section of keys ({', '.join(g.name for g in dataclasses.fields(kind))})"
                              f", got {value!r}")
            else:
                errors += _shape_errors(kind, value, key + ".")
        elif typing.get_origin(kind) in (list, dict) and not isinstance(value, typing.get_origin(kind)):
            errors.append(f"{key} must be a {typing.get_origin(kind).__name__}, got {value!r}")
    return errors


def _allowed_keys(e: ConfigKeyError) -> str:
    if e.object_type is None or not dataclasses.is_dataclass(e.object_type):
        return ""
    names = [f.name for f in dataclasses.fields(e.object_type)]
    return f"; allowed: {', '.join(names)}" if names else "; this section takes no keys yet"


def _constraint_errors(node: Any, prefix: str) -> list[str]:
    """Walk the dataclass tree and check each field's `choices` / bounds metadata."""
    errors: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            errors += _constraint_errors(value, f"{prefix}{key}.")
        return errors
    if not dataclasses.is_dataclass(node):
        return errors
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        errors += _constraint_errors(value, key + ".")
        if value is None or not f.metadata:
            continue
        # a list's constraints hold for each of its entries (`train.seeds`)
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for item_key, item in items:
            errors += _value_errors(item_key, item, f.metadata)
    return errors


def _value_errors(key: str, value: Any, meta: Any) -> list[str]:
    """One value against a field's `choices` / bounds metadata."""
    errors = []
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        errors.append(f"{key}={value!r} is not allowed; choose one of: {allowed}")
    for op, ok, word in (("ge", value.__ge__, ">="), ("gt", value.__gt__, ">"),
                         ("le", value.__le__, "<="), ("lt", value.__lt__, "<")):
        if op in meta and not ok(meta[op]):
            errors.append(f"{key}={value!r} is out of range; it must be {word} {meta[op]}")
    return errors


def _cross_field_errors(cfg: Config) -> list[str]:
    data, errors = cfg.data, []
    if len(data.image_size) != 2 or min(data.image_size) < 8:
        errors.append(f"data.image_size={data.image_size} must be [height, width], each >= 8")
    if data.format == "idx":
        if sorted(data.files) != sorted(IDX_FILE_KEYS):
            errors.append(f"data.files must have exactly the keys {', '.join(IDX_FILE_KEYS)} for format idx")
        for key, spec in data.files.items():
            if not (spec.sha256 or spec.md5):
                errors.append(f"data.files.{key} needs a sha256 (of the content) or md5 (of the .gz)")
        if data.test_size is not None:
            errors.append("data.test_size must be null for format idx: the official test set is the test set")
        if len(data.classes) < 2:
            errors.append("data.classes must name the classes in label order for format idx")
    else:
        if data.test_size is None:
            errors.append("data.test_size is required for format image_folder (a fraction in (0, 1))")
        elif data.val_size + data.test_size >= 1:
            errors.append(f"data.val_size + data.test_size = {data.val_size + data.test_size:g} must be < 1")
        if not data.source and not data.mirrors:
            errors.append("data.source must point at a folder (or archive) of class sub-folders for image_folder")
        if set(data.files) - {"archive"}:
            errors.append("data.files takes only an optional 'archive' entry for format image_folder")
    from pipeline.search_space import SEARCHABLE, parse_space, tunable_names

    for stage in SEARCHABLE:
        section = getattr(cfg, stage)
        try:
            parse_space(section.search.space, f"{stage}.search.space", tunable_names(section))
        except ConfigError as e:
            errors.append(str(e))
    for stage in ("cnn", "cnn_aug", "transfer", "finetune"):
        seeds = getattr(cfg, stage).train.seeds
        if len(set(seeds)) != len(seeds):
            errors.append(f"{stage}.train.seeds={seeds} repeats a seed: list each seed once")
    if cfg.transfer.weights == "hed" and cfg.transfer.backbone != "vgg16":
        errors.append(f"transfer.weights=hed exists for backbone vgg16 only, not {cfg.transfer.backbone}: "
                      "use weights imagenet or null")
    return errors


def write_params(path: Path = PARAMS_FILE, overrides: Sequence[str] = ()) -> None:
    """Compose `conf/` into `path` with DVC's own writer, via a temporary file (validated first)."""
    from dvc.utils.hydra import compose_and_dump

    validate(compose(overrides), source="conf/")
    with atomic_path(Path(path)) as tmp:
        compose_and_dump(tmp, str(CONF_DIR), None, "config", str(CONF_DIR.parent), list(overrides))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipeline.config [OVERRIDES]`: regenerate params.yaml from conf/."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        write_params(overrides=args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {PARAMS_FILE} from conf/" + (f" with {' '.join(args)}" if args else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
