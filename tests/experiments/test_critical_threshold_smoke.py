"""experiments/critical_threshold.py on the digits smoke config (the committed digits models)."""

import json

import numpy as np
import pytest
from exp_helpers import load_config

import jaxrob._keys as tags
from experiments import _common, critical_threshold


def _config():
    cfg = load_config("digits_threshold", "smoke")
    cfg.mesh.num_devices = 2
    cfg.study.batch_size = 2  # 4 images: two stored chunks
    return cfg


# ~90 s; the chunked-run/resume machinery it shares is covered in CI by the robust and jacobian
# smokes
@pytest.mark.slow
def test_critical_threshold_smoke_and_resume(tmp_path, monkeypatch):
    # Reruns below load the same models, whose parameters run_chunks traces, so they reuse the
    # first run's compilation (the attack's is most of this test's time) -- provided the attack
    # is the same object: a functools.partial is a static leaf compared by identity.
    attacks = {}
    make_attack = _common.make_attack

    def same_attack(attack_config):
        key = json.dumps(_common.to_plain(attack_config), sort_keys=True)
        if key not in attacks:
            attacks[key] = make_attack(attack_config)
        return attacks[key]

    monkeypatch.setattr(_common, "make_attack", same_attack)
    cfg = _config()
    res = critical_threshold.run(cfg, tmp_path)
    s = res["summary"]
    assert res["num_images"] == 4 and res["chunks_run"] == 2 == res["chunks_total"]
    assert res["compute_wall_s"] > 0
    assert set(s) >= {"adversarial", "random", "fuzzy", "clean_accuracy", "attack"}
    for kind in ("adversarial", "random"):
        d = s[kind]
        assert 0 <= d["curves"] <= 4
        fk = d["fixed_key"]
        if fk["curves"]:
            assert 0.0 <= fk["step_like_fraction"] <= 1.0
    fz = s["fuzzy"]
    assert 0.0 <= fz["area"] <= 1.0 and 0.0 <= fz["never_broken"] <= 1.0
    assert np.all(np.diff(fz["curve"]["cfr"]) >= 0) and fz["curve"]["cfr"][-1] == 1.0
    assert len(fz["along_adversarial"]) == cfg.study.num_points
    assert 0.0 < s["attack"]["mean_l2"] <= cfg.attack.eps + 1e-4

    per = dict(np.load(tmp_path / "per_example.npz"))
    b, d, n = 4, 1 + cfg.study.random_directions, cfg.study.num_points
    assert per["flips"].shape == (b, d, n)
    assert per["flips_fixed"].shape == (b, d, n, cfg.study.fixed_keys)
    assert per["flips"].min() >= 0 and per["flips"].max() <= cfg.study.num_keys
    assert per["success_prob"].shape == (b,)
    assert np.all((per["success_prob"] >= 0) & (per["success_prob"] <= 1))
    assert per["fit_threshold"].shape == per["fit_slope"].shape == (b, d)
    # the clean image is the s = 0 point of every direction; clipping never lengthens a step
    assert np.all(per["dist"][:, :, 0] == 0)
    assert np.all(per["dist"] <= per["grid"][:, None, :] + 1e-4)
    np.testing.assert_allclose(per["dist"][:, 0, 1], per["grid"][:, 1], rtol=1e-4)
    for name in ("threshold.png", "fuzzy.png"):
        assert (tmp_path / name).stat().st_size > 0
    m = json.loads((tmp_path / "results.json").read_text())["manifest"]
    assert m["indices"] == [0, 4]
    assert res["keys"]["fixed"].startswith(f"f = 0: fold_in(k_i, {tags.FIXED})")

    # a killed run: the second chunk never finished; the rerun computes only it
    (tmp_path / "chunks" / "chunk_2_4.npz").unlink()
    res2 = critical_threshold.run(cfg, tmp_path)
    assert res2["chunks_run"] == 1
    per2 = np.load(tmp_path / "per_example.npz")
    for k in ("flips", "flips_fixed", "success_prob", "adv_l2"):
        np.testing.assert_array_equal(per2[k], per[k])
    assert critical_threshold.run(cfg, tmp_path)["chunks_run"] == 0

    cfg.study.num_keys = 4  # another run's settings: refused, nothing mixed
    with pytest.raises(ValueError, match="another run"):
        critical_threshold.run(cfg, tmp_path)


@pytest.mark.parametrize("field, value, match", [
    ("study.num_points", 2, "study.num_points"),
    ("study.max_step", -1.0, "study.max_step"),
    ("study.num_keys", 0, "study.num_keys"),
    ("study.flip_reference", "clean_label", "study.flip_reference"),
    ("study.batch_size", 3, "does not divide"),
    ("attack.name", "none", "attack.name"),
    ("purifier.enabled", False, "needs a purifier"),
])
def test_bad_input(tmp_path, field, value, match):
    cfg = _config()
    section, leaf = field.split(".")
    cfg[section][leaf] = value
    with pytest.raises(ValueError, match=match):
        critical_threshold.run(cfg, tmp_path)
    assert not (tmp_path / "chunks").exists()


def test_crossings_and_fits():
    grid = np.linspace(0.0, 5.0, 6)
    seq = np.array([[0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1],
                    [0, 0, 0, 0, 0, 0]], bool)
    c = critical_threshold.crossings(seq, grid)
    np.testing.assert_array_equal(c["count"], [3, 1, 0, 0])
    np.testing.assert_array_equal(c["first"], [2.0, 3.0, np.nan, np.nan])
    np.testing.assert_array_equal(c["second"], [4.0, np.nan, np.nan, np.nan])
    # a smooth binomial curve recovers its slope; an all-zero curve is censored
    steps = np.linspace(0.0, 4.0, 25)
    p = 1.0 / (1.0 + np.exp(-3.0 * (steps - 2.0)))
    flips = np.stack([np.round(1000 * p), np.zeros_like(p)])[None]
    fits = critical_threshold.fit_curves(flips, 1000, steps, np.broadcast_to(steps, (1, 2, 25)),
                                         0.95)
    assert abs(fits["slope"][0, 0] - 3.0) < 0.2 and abs(fits["threshold"][0, 0] - 2.0) < 0.05
    assert fits["threshold_lo"][0, 0] < 2.0 < fits["threshold_hi"][0, 0]
    assert fits["censored"][0].tolist() == [False, True]
    assert np.isnan(fits["threshold"][0, 1])


def test_fixed_key_is_robust_evals():
    """Fixed key 0 is robust_eval's (and jacobian_spectrum's) fixed purifier key; the others
    are distinct from it and from each other."""
    import jax.numpy as jnp
    import jax.random as jr

    from jaxrob.evaluation import fixed_purifier_keys

    k_i = jr.fold_in(jr.key(3), 7)
    keys = jr.key_data(critical_threshold._fixed_keys(k_i, 3)).tolist()
    assert keys[0] == jr.key_data(fixed_purifier_keys(jr.key(3), jnp.array([7]))[0]).tolist()
    assert len({tuple(k) for k in keys}) == 3
