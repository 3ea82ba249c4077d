"""DiffAttack rows of experiments/robust_eval.py (``attack.loss="diffattack"``, digits smoke).

The loss itself is tested in tests/purify/test_gdmp_diffattack.py; here: the config builds the
same attack as the library call, the row runs and is recorded, bad rows fail before any work.
"""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from exp_helpers import load_config

from experiments import _common, _robust_eval, robust_eval
from jaxrob import attacks
from jaxrob.data import load_dataset
from jaxrob.purify import DefendedModel

DA = {"name": "ddpm_diffattack", "attack": {"loss": "diffattack"}}


def _defended(cfg):
    test = load_dataset("digits", "test[:2]")
    ddpm, _ = _common.load_ddpm(cfg.ddpm, test.image_shape)
    clf, _ = _common.load_classifier(cfg.classifier, cfg.data)
    return DefendedModel(clf, _common.make_purifier(cfg.purifier, ddpm)), test


def test_config_builds_the_library_attack():
    cfg = load_config("digits_robust", "smoke")
    cfg.attack.loss = "diffattack"
    cfg.attack.diffattack.update(base="dlr", weight=0.5, num_states=2)
    defended, test = _defended(cfg)
    x, y = jnp.asarray(test.images), jnp.asarray(test.labels, jnp.int32)
    key = jr.key(3)
    got = _common.make_attack(cfg.attack, defended=defended)(defended, x, y, key)
    loss = attacks.diffattack_loss(defended, x, base="dlr", weight=0.5, num_states=2)
    want = attacks.pgd(defended, x, y, key, eps=cfg.attack.eps, num_steps=2, eot_samples=2,
                       loss=loss)
    np.testing.assert_array_equal(np.asarray(got.x_adv), np.asarray(want.x_adv))
    # the plain CE attack is another attack: the deviation term moves the iterates
    ce = attacks.pgd(defended, x, y, key, eps=cfg.attack.eps, num_steps=2, eot_samples=2)
    assert not np.array_equal(np.asarray(ce.x_adv), np.asarray(want.x_adv))


def test_diffattack_row_runs_and_is_recorded(tmp_path):
    cfg = load_config("digits_robust", "smoke")
    cfg.data.num_images = 2
    cfg.eval.batch_size = 8
    cfg.rows = (DA,)
    (row,) = robust_eval.run(cfg, tmp_path)["rows"]
    assert row["attack"]["loss"] == "diffattack"
    assert row["attack"]["diffattack"] == {"base": "ce", "weight": 1.0, "num_states": None}
    assert row["adv"]["one_shot"]["num_images"] == 2 and row["mean_linf"] <= 0.2 + 1e-6
    assert "loss ce + 1 x deviation (DiffAttack)" in (tmp_path / "table.md").read_text()


def test_plain_rows_do_not_record_the_diffattack_options():
    cfg = load_config("digits_robust", "smoke")
    assert "diffattack" not in _robust_eval._attack_plain(cfg)
    cfg.attack.loss = "diffattack"
    assert _robust_eval._attack_plain(cfg)["diffattack"]["weight"] == 1.0


@pytest.mark.parametrize("row, match", [
    ({"name": "x", "purifier": {"enabled": False}, "attack": {"loss": "diffattack"}},
     "needs a purifier with exact gradients"),
    ({"name": "x", "purifier": {"gradient": "bpda"}, "attack": {"loss": "diffattack"}},
     "needs a purifier with exact gradients"),
    ({"name": "x", "eval": {"randomness": "fixed"}, "attack": {"loss": "diffattack"}},
     "expected eval.randomness='stochastic'"),
    ({"name": "x", "attack": {"loss": "diffattack", "diffattack": {"base": "kl"}}},
     "attack.diffattack.base"),
    ({"name": "x", "attack": {"loss": "diffattack", "diffattack": {"weight": -1.0}}},
     "attack.diffattack.weight"),
])
def test_bad_diffattack_rows_fail_before_work(tmp_path, row, match):
    cfg = load_config("digits_robust", "smoke")
    cfg.rows = (row,)
    with pytest.raises(ValueError, match=match):
        robust_eval.run(cfg, tmp_path)
    assert not list(tmp_path.glob("x/chunks/chunk_*"))
