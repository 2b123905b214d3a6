"""Config: YAML + key=value overrides, typed; every mistake names the key (and the file)."""

import warnings

import pytest

from bfly.core.config import ConfigError, changed_keys, dump_yaml, flat, from_dict, load_config, replace, to_dict

from conftest import REPO, run_python


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "optim.lr=1", "optim.betas=[0.8, 0.9]", "wandb.tags=[a, b]"])
    assert cfg.train.epochs == 3
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.wandb.tags == ["a", "b"]


def test_a_bare_off_in_yaml_means_the_off_choice(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\n")
    assert load_config(path).train.amp == "off"
    assert load_config(None, ["train.amp=off"]).train.amp == "off"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: vgg19_bn\ntrain:\n  epochs: 5\n")
    cfg = load_config(path, ["train.epochs=7"])
    assert cfg.model.name == "vgg19_bn" and cfg.train.epochs == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("trian.epochs=3", "unknown config key 'trian.epochs'"),
        ("train.epochs=abc", "train.epochs: expected int, got str 'abc'"),
        ("train.epochs=1.5", "train.epochs: expected int, got float 1.5"),
        ("train.epochs=true", "train.epochs: expected int, got bool True"),
        ("model.name=resnet18", "model.name: 'resnet18' is not one of resnet50, vgg19, vgg19_bn, resnet_tiny"),
        ("optim.betas=0.9", "optim.betas: expected a list"),
        ("optim.betas=[0.9,0.99,0.5]", "optim.betas: must be two values in [0, 1)"),
        ("optim.betas=[0.9]", "optim.betas: must be two values in [0, 1)"),
        ("optim.betas=[1.5,0.9]", "optim.betas: must be two values in [0, 1)"),
        ("train.epochs=0", "train.epochs: must be > 0"),
        ("train.ema_decay=1.0", "train.ema_decay: must be in [0, 1)"),
        ("train.eval_splits=[dev]", "train.eval_splits: unknown split 'dev'"),
        ("epochs", "not of the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_bad_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 2\n  bacth_size: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "train.bacth_size" in str(e.value)


def test_wrong_type_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  image_size: large\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "data.image_size: expected int" in str(e.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_a_saved_dict():
    cfg = load_config(None, ["model.name=vgg19", "optim.lr=0.3"])
    assert from_dict(to_dict(cfg)) == cfg
    assert "name: vgg19" in dump_yaml(cfg)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


def test_cli_help_lists_every_key_and_bad_key_exits_2():
    out = run_python("-m", "bfly.train", "--help", timeout=120)
    assert out.returncode == 0
    for key in ("model.name", "train.batch_size", "optim.lr", "run.resume", "dist.bucket_cap_mb", "wandb.mode"):
        assert key in out.stdout
    bad = run_python("-m", "bfly.train", "train.bacth_size=3", timeout=120)
    assert bad.returncode == 2
    assert "unknown config key 'train.bacth_size'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_renamed_preset_seed_still_loads_as_course_with_a_warning(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  preset: seed\n")
    with pytest.warns(FutureWarning, match="data.preset='seed' is deprecated, it is now called 'course'"):
        cfg = load_config(old)
    assert cfg.data.preset == "course"
    saved = to_dict(cfg) | {"data": to_dict(cfg)["data"] | {"preset": "seed"}}  # a checkpoint from before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint is not the user's file: no warning
        assert from_dict(saved) == cfg
    assert changed_keys(flat(saved), flat(to_dict(cfg))) == []  # a resume sees no change


def test_replace_changes_a_config_through_the_override_checks():
    cfg = load_config(None, [])
    new = replace(cfg, {"data.workers": 0, "data.root": "/elsewhere"})
    assert (new.data.workers, new.data.root) == (0, "/elsewhere") and cfg.data.workers == 4
    with pytest.raises(ConfigError, match=r"data\.workers: must be >= 0"):
        replace(cfg, {"data.workers": -1})
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.wrokers'"):
        replace(cfg, {"data.wrokers": 0})
