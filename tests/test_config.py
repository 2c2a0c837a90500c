"""Typed config: files, extends, overrides, one-line errors for every kind of mistake, --help."""

import re
import subprocess
import sys

import pytest
import yaml

from fmdist.config import config_keys, format_default, load_config, to_yaml
from fmdist.errors import FmdistError

from helpers import CONFIGS, REPO


@pytest.mark.parametrize("name", ["base", "tutorial", "scratch", "pretrained", "frozen", "partial", "smoke"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.output_dir == f"runs/{name}"
    assert cfg.optimizer.lr == pytest.approx(1e-3)


def test_the_tutorial_defaults():
    cfg = load_config(CONFIGS / "base.yaml")
    assert (cfg.model.arch, cfg.epochs, cfg.batch_size, cfg.optimizer.name) == ("resnet18", 20, 256, "adam")
    assert (cfg.model.in_channels, cfg.model.num_classes, cfg.data.image_size) == (1, 10, 28)


def test_the_tutorial_config_is_base_as_the_tutorial_ran_it():
    tutorial, base = load_config(CONFIGS / "tutorial.yaml"), load_config(CONFIGS / "base.yaml")
    assert (tutorial.mixed_precision, tutorial.model.stem_init) == ("no", "random")
    tutorial.mixed_precision, tutorial.model.stem_init = "auto", "rgb_sum"
    tutorial.output_dir, tutorial.name = base.output_dir, base.name
    assert tutorial == base


def test_holdout_replaces_the_test_file_and_not_both():
    csv = ["data.source=csv", "data.train_csv=all.csv"]
    assert load_config(None, [*csv, "data.holdout=200"]).data.holdout == 200
    for items, expected in (
        ([*csv], "data.test_csv"),
        ([*csv, "data.test_csv=t.csv", "data.holdout=5"], "data.test_csv"),
        ([*csv, "data.holdout=0"], "data.holdout"),
    ):
        with pytest.raises(FmdistError, match=f"key '{expected}'"):
            load_config(None, items)


def test_regime_files_set_their_regime():
    regimes = ("scratch", "pretrained", "frozen", "partial")
    assert [load_config(CONFIGS / f"{r}.yaml").regime for r in regimes] == list(regimes)
    assert load_config(CONFIGS / "partial.yaml").model.unfreeze == ["layer4"]
    assert load_config(CONFIGS / "smoke.yaml").data.source == "synthetic"


def test_overrides_are_typed_and_win_over_files():
    cfg = load_config(
        CONFIGS / "scratch.yaml",
        [
            "epochs=3",
            "optimizer.lr=1e-2",
            "model.arch=resnet50",
            "data.augment=true",
            "model.init_from=null",
            "mixed_precision=BF16",
        ],
    )
    assert (cfg.epochs, cfg.optimizer.lr, cfg.model.arch, cfg.data.augment) == (3, 0.01, "resnet50", True)
    assert cfg.model.init_from is None and cfg.mixed_precision == "bf16"


def test_unquoted_no_and_off_are_choices_not_booleans(tmp_path):
    (tmp_path / "plain.yaml").write_text("mixed_precision: no\nprogress: off\n")
    cfg = load_config(tmp_path / "plain.yaml")
    assert (cfg.mixed_precision, cfg.progress) == ("no", "off")
    assert load_config(None, ["progress=off", "mixed_precision=no"]).progress == "off"
    with pytest.raises(FmdistError, match="key 'data.augment': expected true or false"):
        load_config(None, ["data.augment=maybe"])


def test_extends_chains_and_yaml_exponent_without_dot(tmp_path):
    (tmp_path / "parent.yaml").write_text("extends: " + str(CONFIGS / "base.yaml") + "\nepochs: 7\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\noptimizer:\n  lr: 5e-4\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.epochs, cfg.optimizer.lr, cfg.output_dir) == (7, 5e-4, "runs/child")


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("optimiser:\n  lr: 0.1\n", [], r"c.yaml: unknown key 'optimiser.lr'; did you mean 'optimizer.lr'\?"),
        ("model:\n  achr: resnet18\n", [], r"c.yaml: unknown key 'model.achr'; did you mean 'model.arch'\?"),
        ("epoch: 3\n", [], r"unknown key 'epoch'; did you mean 'epochs'\?"),
        ("", ["data.sorce=csv"], r"command line: unknown key 'data.sorce'; did you mean 'data.source'\?"),
        ("", ["batch-size=3"], r"unknown key 'batch-size'; did you mean 'batch_size'\?"),
        ("", ["epochs"], r"command line: expected key=value, got 'epochs'"),
        ("epochs: three\n", [], r"c.yaml: key 'epochs': expected an integer, got 'three'"),
        ("epochs: 2.5\n", [], r"key 'epochs': expected an integer, got 2.5"),
        ("", ["optimizer.lr=fast"], r"command line: key 'optimizer.lr': expected a number, got 'fast'"),
        ("data:\n  augment: maybe\n", [], r"key 'data.augment': expected true or false, got 'maybe'"),
        (
            "",
            ["regime=froze"],
            r"key 'regime': expected one of scratch\|pretrained\|frozen\|partial, got 'froze' \(did you mean 'frozen'\?\)",
        ),
        ("", ["model.arch=resnet20"], r"key 'model.arch': expected one of resnet18\|resnet34"),
        ("optimizer:\n  lr: -0.1\n", [], r"c.yaml: key 'optimizer.lr': expected a positive number, got -0.1"),
        ("epochs: 0\n", [], r"c.yaml: key 'epochs': expected at least 1, got 0"),
        ("", ["batch_size=0"], r"command line: key 'batch_size': expected at least 1, got 0"),
        ("", ["data.image_size=4"], r"key 'data.image_size': expected between 8 and 512, got 4"),
        ("", ["data.source=csv"], r"key 'data.train_csv': expected a CSV path when data.source is csv"),
        ("model: resnet18\n", [], r"c.yaml: key 'model' is a section"),
        ("epochs: [1\n", [], r"c.yaml: line \d+ not valid YAML"),
        ("- 1\n- 2\n", [], r"c.yaml: expected a mapping"),
    ],
)
def test_mistakes_give_one_line_naming_origin_and_key(tmp_path, text, overrides, expected):
    with pytest.raises(FmdistError, match=expected) as error:
        load_config(write(tmp_path, text), overrides)
    assert "\n" not in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FmdistError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_reloads_to_the_same_config(tmp_path):
    cfg = load_config(CONFIGS / "smoke.yaml", ["optimizer.lr=0.002", "output_dir=/tmp/x"])
    saved = write(tmp_path, to_yaml(cfg))
    again = load_config(saved)
    again.name = cfg.name
    assert again == cfg


def test_help_lists_every_key_with_its_default():
    result = subprocess.run(
        [sys.executable, "-m", "fmdist.train", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0
    for info in config_keys():
        assert re.search(
            rf"^  {re.escape(info.key)} = {re.escape(format_default(info.default))}  \[", result.stdout, re.M
        ), info.key


def test_readme_config_reference_lists_every_key_with_its_default():
    readme = (REPO / "README.md").read_text()
    for info in config_keys():
        assert f"| `{info.key}` | `{format_default(info.default)}` |" in readme, info.key


def test_every_key_has_help_text():
    assert all(info.help for info in config_keys())
    assert len({info.key for info in config_keys()}) == len(config_keys())
    assert yaml.safe_load(format_default(1e-3)) == 1e-3
