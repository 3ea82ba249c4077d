"""Clear errors for bad configs, before any compilation; the CLI wiring of the entry points."""

import pathlib
import subprocess
import sys

import pytest
from exp_helpers import REPO, load_config

from experiments import main, train_classifier, train_diffusion
from jaxrob.models import (
    classifier_from_metadata,
    diffusion_module_from_metadata,
    schedule_from_metadata,
    unet_from_metadata,
)

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds(name):
    from experiments import _common

    mod_doc = __import__(f"configs.{name}", fromlist=["x"]).__doc__
    assert "python experiments/" in mod_doc  # the exact command is documented
    for arg in (None, "smoke"):
        cfg = load_config(name, arg)
        assert "mesh" in cfg and "seed" in cfg
        if "defence" in cfg:  # DiffDefense: the defence, every row and its attack build
            from experiments import _diffdefense_eval as dd
            from jaxrob.models import DiffusionModel

            schedule = schedule_from_metadata(_common.to_plain(cfg.ddpm.diffusion))
            unet = unet_from_metadata(_common.to_plain(cfg.ddpm.model))
            model = DiffusionModel(unet, {}, schedule)  # options are checked, nothing runs
            for row in cfg.rows:
                rc = _common.row_config(cfg, row)
                dd.check_row(rc, row)
                dd.make_defence(rc.defence, model)
                dd.make_attack(rc.attack)
            continue
        if "rows" in cfg or "study" in cfg:  # every row's purifier and attack build
            from jaxrob.models import DiffusionModel

            schedule = schedule_from_metadata(_common.to_plain(cfg.ddpm.diffusion))
            unet = diffusion_module_from_metadata(_common.to_plain(cfg.ddpm.model))
            model = DiffusionModel(unet, {}, schedule)  # options are checked, nothing runs
            _common.make_purifier(cfg.purifier, model)
            for row in (*cfg.get("rows", ()), *cfg.get("settings", ())):
                rc = _common.row_config(cfg, row)
                _common.make_purifier(rc.purifier, model)
                if "attack" in rc:
                    _common.make_attack(rc.attack)
            if "attack" in cfg:
                _common.make_attack(cfg.attack)
            continue
        if "addt" in cfg:  # a fine-tune of exports: its options are checked, nothing loaded
            from experiments import _train_addt

            _train_addt.addt_options(cfg)
            continue
        if cfg.get("stage") == "autoencoder":  # latent diffusion, stage 1: the network builds
            from jaxrob.models import autoencoder_from_metadata

            autoencoder_from_metadata(_common.to_plain(cfg.autoencoder))
            continue
        subs = [cfg.ddpm, cfg.classifier] if name == "main" else [cfg]
        for sub in subs:
            if "diffusion" in sub:
                unet_from_metadata(_common.to_plain(sub.model))
                assert (schedule_from_metadata(_common.to_plain(sub.diffusion)).num_steps
                        == sub.diffusion.num_steps)
            elif sub.model.get("name"):
                classifier_from_metadata(_common.to_plain(sub.model), 10)
    with pytest.raises(ValueError, match="config variant"):
        load_config(name, "smok")


def test_batch_not_divisible_by_device_count(tmp_path):
    cfg = load_config("digits_ddpm", "smoke")
    cfg.train.batch_size = 12
    with pytest.raises(ValueError, match="does not divide over the 8 devices"):
        train_diffusion.run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("field, value, match", [
    ("learning_rate", -1e-3, "learning_rate"),
    ("weight_decay", -1.0, "weight_decay"),
    ("num_steps", 0, "train.num_steps"),
    ("optimizer", "adagrad", "optimizer"),
])
def test_nonsense_hyperparameters(tmp_path, field, value, match):
    cfg = load_config("digits_classifier", "smoke")
    cfg.train[field] = value
    with pytest.raises(ValueError, match=match):
        train_classifier.run(cfg, tmp_path)
    assert not any((tmp_path / "checkpoints").glob("*"))


def test_bad_ema_and_sampler(tmp_path):
    cfg = load_config("digits_ddpm", "smoke")
    cfg.train.ema_decay = 1.5
    with pytest.raises(ValueError, match="ema_decay"):
        train_diffusion.run(cfg, tmp_path)


def test_missing_data_file(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    cfg = load_config("mnist_ddpm", "smoke")
    cfg.data.data_dir = str(empty)
    with pytest.raises(FileNotFoundError, match="mnist"):
        train_diffusion.run(cfg, tmp_path / "wd")


def test_main_with_missing_checkpoints_dir_parent_is_fine_but_bad_variant_is_not():
    with pytest.raises(ValueError, match="config variant"):
        load_config("main", "fast")
    assert main.DEFAULT_CONFIG.endswith("configs/main.py")


def _cli(script, *args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "experiments" / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_cli_missing_weights_fails_clearly(tmp_path):
    r = _cli("eval_classifier.py",
             "--config", str(REPO / "configs/cifar10_resnet20_pretrained.py:smoke"),
             "--config.model.path=nope/resnet20.npz", "--workdir", str(tmp_path))
    assert r.returncode != 0
    assert "no pretrained weights at" in r.stderr and "nope/resnet20.npz" in r.stderr


def test_cli_mistyped_override_fails_loudly(tmp_path):
    r = _cli("train_diffusion.py", "--config", str(REPO / "configs/digits_ddpm.py:smoke"),
             "--config.train.nmu_steps=3", "--workdir", str(tmp_path))
    assert r.returncode != 0 and "nmu_steps" in r.stderr
    assert not pathlib.Path(tmp_path / "checkpoints").exists()
