"""Configuration: composition of conf/, params.yaml in sync, overrides, and every kind of validation error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.errors import ConfigError
from tests.conftest import REPO


def test_params_yaml_is_the_composition_of_conf(tmp_path):
    fresh = tmp_path / "params.yaml"
    config.write_params(fresh)
    assert (REPO / "params.yaml").read_text() == fresh.read_text(), "params.yaml is stale: run `make params`"


def test_params_yaml_validates():
    cfg = config.load(REPO / "params.yaml")
    assert cfg.data.name == "fashion_mnist" and cfg.profile == "cpu"
    assert cfg.data.files["train_images"].sha256.startswith("c59f468a")


@pytest.mark.parametrize("group", ["fashion_mnist", "mnist"])
def test_every_idx_data_set_composes(group):
    assert config.load(overrides=[f"data={group}"]).data.name == group


def test_profile_and_value_overrides():
    cfg = config.load(overrides=["profile=smoke", "data.val_size=0.2"])
    assert (cfg.profile, cfg.data.limit_train, cfg.data.val_size) == ("smoke", 600, 0.2)
    assert config.load(overrides=["data=image_folder", "data.source=/x"]).data.test_size == 0.2


def test_composition_is_what_dvc_writes(tmp_path):
    """`python -m pipeline.config` uses DVC's own writer, so `dvc exp run -S` produces the same file."""
    from dvc.utils.hydra import compose_and_dump

    ours, dvcs = tmp_path / "ours.yaml", tmp_path / "dvc.yaml"
    config.write_params(ours, ["data.val_size=0.2"])
    compose_and_dump(dvcs, str(config.CONF_DIR), None, "config", str(REPO), ["data.val_size=0.2"])
    assert ours.read_text() == dvcs.read_text()


BAD_OVERRIDES = [
    (["+data.bar=1"], "unknown key 'data.bar'; allowed: name, format"),
    (["+colour=red"], "unknown key 'colour'"),
    (["data.val_size=abc"], "data.val_size: Value 'abc' of type 'str' could not be converted to Float"),
    (["data.val_size=1.5"], "data.val_size=1.5 is out of range; it must be < 1.0"),
    (["data.retries=0"], "data.retries=0 is out of range; it must be >= 1"),
    (["data.channels=2"], "data.channels=2 is not allowed; choose one of: 1, 3"),
    (["data.format=csv"], "data.format='csv' is not allowed; choose one of: idx, image_folder"),
    (["tuner.kind=grid"], "tuner.kind='grid' is not allowed; choose one of: random, bayesian, hyperband"),
    (["profile=nope"], "Could not find 'profile/nope' Available options in 'profile': cpu gpu smoke"),
    (["data.foo=1"], "Could not override 'data.foo'"),
    (["data.test_size=0.2"], "data.test_size must be null for format idx"),
    (["data.files.train_images.sha256=null", "data.files.train_images.md5=null"],
     "data.files.train_images needs a sha256"),
    (["data.image_size=[28]"], "data.image_size=[28] must be [height, width]"),
    (["data=image_folder"], "data.source must point at a folder"),
    (["data=image_folder", "data.source=/x", "data.val_size=0.5", "data.test_size=0.5"],
     "data.val_size + data.test_size = 1 must be < 1"),
    (["cnn.train.seeds=[0,-1]"], "cnn.train.seeds[1]=-1 is out of range; it must be >= 0"),
    (["finetune.train.seeds=[3,3]"], "finetune.train.seeds=[3, 3] repeats a seed: list each seed once"),
    (["+cnn.search.space.seeds={choice: [[0], [1]]}"], "cnn.search.space.seeds: not a setting of this stage"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_OVERRIDES)
def test_bad_values_fail_in_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        config.load(overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_key_in_params_file(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["data"]["val_size"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"params.yaml: data.val_size is missing; set it in conf/"):
        config.load(tmp_path / "params.yaml")


@pytest.mark.parametrize(("content", "message"), [
    (None, "not found; run `make params`"),
    ("data: [unclosed", "not valid YAML"),
    ("- a list", "expected a mapping of sections"),
])
def test_unreadable_params_file(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_stage_command_rejects_bad_config_before_any_work(tmp_path):
    """A stage run with a bad override exits 2 with one error line and writes nothing."""
    result = subprocess.run([sys.executable, "-m", "pipeline.stages.split", "data.val_size=2"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "data.val_size=2.0 is out of range" in errors[0]
    assert "Traceback" not in result.stderr
    assert list(Path(tmp_path).iterdir()) == []
