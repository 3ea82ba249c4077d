"""DW-box randomness modes (fixed, forward_lock) and ADDT's Fixed-AutoAttack protocol.

Purifier level: an elementwise stand-in eps-model (no UNet), so every program compiles in
seconds.
Evaluation level: models that reveal the keys they were called with (no diffusion), so the key
plumbing of attack and scoring is checked exactly; one real Purifier check closes the loop.
"""

import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob._keys as tags
import jaxrob.diffusion as jd
from jaxrob.attacks import AttackResult
from jaxrob.evaluation import (
    evaluate_robustness,
    fixed_aa_score,
    fixed_purifier_keys,
    parse_protocol,
    robust_scores,
    score_adversarial,
    score_predictions,
)
from jaxrob.parallel import make_mesh
from jaxrob.purify import DefendedModel, diffdefense, diffpure, example_keys, multistage

B = 8
X = jr.uniform(jr.key(0), (B, 8, 8, 1), minval=0.1, maxval=0.9)
W_CLF = jr.normal(jr.key(2), (64, 10))
INDICES = np.arange(40, 40 + B)
KEY = jr.key(7)


def eps_fn(x, step):  # a stand-in eps-model: elementwise, so programs compile in seconds
    return 0.3 * jnp.tanh(x) + 0.001 * step.astype(x.dtype)[:, None, None, None]


def clf(x, key=None):
    return x.reshape(x.shape[0], -1) @ W_CLF


SCHEDULE = jd.linear_schedule()


def _pur(sampler="ddpm", **kw):
    return diffpure(eps_fn, SCHEDULE, t_star=0.3, num_steps=2, sampler=sampler, **kw)


# ------------------------------------------------------------------------------ purifier level
def test_forward_key_fixes_exactly_the_forward_noise():
    pur = _pur("ddpm")
    traj = jax.jit(pur.trajectory)
    f, k1, k2 = jr.key(3), jr.key(4), jr.key(5)
    xt1, s1 = traj(X, k1, f)
    xt2, s2 = traj(X, k2, f)
    # the x_t after the forward step is identical; the reverse noise (hence the states) is not
    np.testing.assert_array_equal(xt1, xt2)
    assert float(jnp.abs(s1[-1] - s2[-1]).max()) > 1e-3
    # forward_key = key is the plain call ("fixed": one key fixes both), bit for bit
    xt0, s0 = traj(X, k1, None)
    xt0b, s0b = traj(X, k1, k1)
    np.testing.assert_array_equal(xt0, xt0b)
    np.testing.assert_array_equal(s0, s0b)
    np.testing.assert_array_equal(traj(X, k1, None)[1], s0)  # same key: same everything
    # the forward noise is the one a plain call with key f draws
    np.testing.assert_array_equal(xt1, traj(X, f, None)[0])
    assert float(jnp.abs(xt0 - xt1).max()) > 0


def test_forward_key_per_example_and_multistage():
    keys = example_keys(jr.key(0), jnp.arange(B))
    fkeys = example_keys(jr.key(1), jnp.arange(B))
    # DDIM eta=0: the reverse process is deterministic, so under a fixed forward key the output
    # does not depend on the (reverse) key, in every stage; another forward key changes it
    ms = multistage(eps_fn, SCHEDULE, stages=[(0.2, 2), (0.1, 1)], sampler="ddim")
    f = jax.jit(lambda x, k, fk: ms(x, k, forward_key=fk))
    a, b = f(X, keys, fkeys), f(X, fold_all(keys, 9), fkeys)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(jnp.abs(a - f(X, keys, fold_all(fkeys, 9))).max()) > 1e-3
    # DDPM multistage: the reverse key matters
    ms2 = ms.replace(sampler="ddpm")
    g = jax.jit(lambda x, k, fk: ms2(x, k, forward_key=fk))
    assert float(jnp.abs(g(X, keys, fkeys) - g(X, fold_all(keys, 9), fkeys)).max()) > 1e-3


def fold_all(keys, tag):
    return jax.vmap(lambda k: jr.fold_in(k, tag))(keys)


# ---------------------------------------------------------------------------- evaluation level
def bits(keys, tag, mod):
    """(B,) ints in [0, mod) from ``fold_in(keys[i], tag)`` (cheaper to compile than randint)."""
    return jax.vmap(lambda k: jr.key_data(jr.fold_in(k, tag))[0] % mod)(keys).astype(jnp.int32)


class KeySpy:
    """A defended model whose prediction reveals its noise: class ``8 f + r`` of 64, ``f`` from
    the forward-noise key (a Purifier's ``fold_in(forward_key or key, PURIFY_FORWARD)``), ``r``
    from the reverse key (``fold_in(key, PURIFY_REVERSE)``)."""

    splits_randomness = True

    def __call__(self, x, keys, forward_key=None):
        fk = keys if forward_key is None else forward_key
        cls = 8 * bits(fk, tags.PURIFY_FORWARD, 8) + bits(keys, tags.PURIFY_REVERSE, 8)
        return jax.nn.one_hot(cls, 64) + 0.0 * x.reshape(x.shape[0], -1)[:, :1]


SAMPLES = 4  # the spy attack's "EoT samples"


def spy_attack(model, x, y, key):
    """Writes the classes the model gave on SAMPLES keys into the first pixels of x_adv."""
    seen = jnp.stack([jnp.argmax(model(x, jr.fold_in(key, v)), -1) for v in range(SAMPLES)], -1)
    flat = x.reshape(x.shape[0], -1)
    x_adv = flat.at[:, :SAMPLES].set(seen / 64.0).reshape(x.shape)
    return AttackResult(x_adv, jnp.zeros((x.shape[0],)))


def _decode(x_adv):
    seen = np.rint(np.asarray(x_adv).reshape(B, -1)[:, :SAMPLES] * 64).astype(int)
    return seen // 8, seen % 8


@functools.cache
def _spy_record(randomness):
    keys = example_keys(KEY, INDICES)
    f = jax.jit(functools.partial(robust_scores, KeySpy(), spy_attack,
                                  protocols=("one_shot", "average@6"), randomness=randomness))
    return {k: np.asarray(v) for k, v in f(X, jnp.zeros((B,), jnp.int32), keys).items()}


def _forward_class(keys):
    return np.asarray(bits(keys, tags.PURIFY_FORWARD, 8))


def test_forward_lock_fixes_the_forward_noise_in_attack_and_scoring():
    rec = _spy_record("forward_lock")
    f_att, r_att = _decode(rec["x_adv"])
    # the forward noise: the fixed mode's key, the same in every attack sample and every
    # scoring purification of the clean and the adversarial input
    want = _forward_class(fixed_purifier_keys(KEY, INDICES))
    for preds in (rec["pred_clean"], rec["pred_adv"]):
        assert preds.shape == (B, 6)
        np.testing.assert_array_equal(preds // 8, np.repeat(want[:, None], 6, 1))
    np.testing.assert_array_equal(f_att, np.repeat(want[:, None], SAMPLES, 1))
    # the reverse noise is fresh: it varies over purifications and over attack samples
    for r in (rec["pred_clean"] % 8, rec["pred_adv"] % 8, r_att):
        assert (r != r[:, :1]).any(1).mean() >= 0.75


def test_fixed_fixes_both_and_stochastic_neither():
    rec = _spy_record("fixed")
    f_att, r_att = _decode(rec["x_adv"])
    assert rec["pred_adv"].shape == (B, 1)  # one purification: it is deterministic
    fixed = fixed_purifier_keys(KEY, INDICES)
    cls = _forward_class(fixed) * 8 + np.asarray(bits(fixed, tags.PURIFY_REVERSE, 8))
    np.testing.assert_array_equal(f_att * 8 + r_att, np.repeat(cls[:, None], SAMPLES, 1))
    np.testing.assert_array_equal(rec["pred_clean"][:, 0], cls)
    np.testing.assert_array_equal(rec["pred_adv"][:, 0], cls)
    st = _spy_record("stochastic")
    f_att, _ = _decode(st["x_adv"])
    assert (st["pred_clean"] // 8 != st["pred_clean"][:, :1] // 8).any(1).mean() >= 0.75
    assert (f_att != f_att[:, :1]).any(1).mean() >= 0.75


def test_forward_lock_with_a_real_purifier_equals_fixed_when_the_reverse_is_deterministic():
    """DDIM eta=0 draws only forward noise: forward_lock and fixed are then the same map (same
    forward key), and all N purifications of forward_lock agree; with DDPM they need not."""
    keys = example_keys(KEY, INDICES)
    y = jnp.argmax(clf(X), -1)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def logits_of(randomness, sampler):
        d = DefendedModel(clf, _pur(sampler))
        return robust_scores(d, None, X, y, keys, protocols=("average@3",),
                             randomness=randomness)["pred_clean"]

    lock, fixed = logits_of("forward_lock", "ddim"), logits_of("fixed", "ddim")
    np.testing.assert_array_equal(lock, np.repeat(fixed, 3, 1))


# ----------------------------------------------------------------------------- Fixed-AA
def test_fixed_aa_score_is_the_minimum_over_candidates_of_the_fraction():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 3, size=(4, 7, 16))  # (C, N, B)
    y = rng.integers(0, 3, size=16)
    for n in (1, 5, 7):
        want = np.min(np.mean(preds[:, :n] == y, axis=1), axis=0)
        np.testing.assert_allclose(fixed_aa_score(preds, y, n), want)
        np.testing.assert_allclose(fixed_aa_score(jnp.asarray(preds), jnp.asarray(y), n), want)
        # one candidate: average@N; adding candidates never raises the score
        np.testing.assert_allclose(fixed_aa_score(preds[:1], y, n),
                                   score_predictions(preds[0], y, f"average@{n}"))
        assert np.all(fixed_aa_score(preds, y, n) <= fixed_aa_score(preds[:2], y, n))
        np.testing.assert_allclose(score_predictions(preds[0], y, f"fixed_aa@{n}"),
                                   score_predictions(preds[0], y, f"average@{n}"))
    assert parse_protocol("fixed_aa@20") == ("fixed_aa", 20)


def pixel_model(x, keys=None):
    """Deterministic: the class is floor(10 * first pixel)."""
    return jax.nn.one_hot(jnp.floor(x.reshape(x.shape[0], -1)[:, 0] * 10).astype(jnp.int32), 10)


def noisy_pixel_model(x, keys, forward_key=None):
    """Randomised: class 0 (right) with probability 1 - (first pixel), else class 1."""
    p = x.reshape(x.shape[0], -1)[:, 0]
    u = bits(keys, tags.PURIFY_REVERSE, 1000) / 1000.0
    return jax.nn.one_hot(jnp.where(u >= p, 0, 1), 10)


noisy_pixel_model.splits_randomness = True

X0 = jnp.full((B, 8, 8, 1), 0.05)  # class 0 under pixel_model: every clean image is right
Y0 = jnp.zeros((B,), jnp.int32)
# per example: the first pixel of the attack's result and of its 3 iterates
ADV_PIX = np.array([0.05, 0.55, 0.05, 0.05, 0.95, 0.05, 0.05, 0.05], np.float32)
ITER_PIX = np.array([[0.05] * 3, [0.05] * 3, [0.05, 0.35, 0.05], [0.05, 0.05, 0.05],
                     [0.05] * 3, [0.05, 0.05, 0.75], [0.05] * 3, [0.05] * 3], np.float32)
SECOND_PIX = np.array([0.05, 0.05, 0.05, 0.45, 0.05, 0.05, 0.05, 0.05], np.float32)


def _set_pixel(x, v):
    flat = x.reshape(x.shape[0], -1)
    return flat.at[:, 0].set(v).reshape(x.shape)


def scripted_attack(model, x, y, key, *, table=ADV_PIX, iterates=True):
    """Per example (read off the label-free image: example i has x[..., 1] = i / 64)."""
    i = jnp.rint(x.reshape(x.shape[0], -1)[:, 1] * 64).astype(jnp.int32)
    x_adv = _set_pixel(x, jnp.asarray(table)[i])
    its = (jnp.stack([_set_pixel(x, jnp.asarray(ITER_PIX)[i, t]) for t in range(3)])
           if iterates else None)
    return AttackResult(x_adv, jnp.zeros((x.shape[0],)), its)


XS = X0.reshape(B, -1).at[:, 1].set(jnp.arange(B) / 64.0).reshape(X0.shape)


def _evaluate(model, attack, randomness="stochastic", batch_size=B, devices=1, **kw):
    kw.setdefault("protocols", ("one_shot", "average@4", "fixed_aa@4"))
    return evaluate_robustness(model, attack, XS, np.zeros(B, np.int64), INDICES, key=KEY,
                               randomness=randomness, batch_size=batch_size,
                               mesh=make_mesh(devices), progress=False, self_check=0, **kw)


second_attack = functools.partial(scripted_attack, table=SECOND_PIX)


def test_fixed_aa_on_a_deterministic_model_is_one_shot_and_keeps_the_worst_candidate():
    det = lambda x, keys: pixel_model(x)
    res = _evaluate(det, functools.partial(scripted_attack, iterates=False))
    per = res["per_example"]
    assert res["clean"]["one_shot"]["accuracy"] == 1.0  # every clean image is right
    # no extra candidates: Fixed-AA is the one-shot accuracy (example by example)
    np.testing.assert_array_equal(per["adv@fixed_aa@4"], per["adv@one_shot"])
    assert res["adv"]["fixed_aa@4"] == res["adv"]["one_shot"]
    np.testing.assert_array_equal(per["adv@one_shot"], ADV_PIX < 0.1)
    assert "pred_cand" not in per and res["candidates"] == []
    # iterates 1 and 2 and a second attack as candidates: per example the worst of all
    res = _evaluate(det, (scripted_attack, second_attack), candidates=(1, 2))
    per = res["per_example"]
    # iterates 1, 2 of the first attack, then iterates 1, 2 and the result of the second one
    assert per["pred_cand"].shape == (B, 5, 4)
    cands = np.stack([ADV_PIX, ITER_PIX[:, 1], ITER_PIX[:, 2], SECOND_PIX])
    np.testing.assert_array_equal(per["adv@fixed_aa@4"], np.all(cands < 0.1, 0))
    np.testing.assert_array_equal(per["adv@fixed_aa@4"], [1, 0, 0, 0, 0, 0, 1, 1])
    # the other protocols score the first attack's x_adv alone
    np.testing.assert_array_equal(per["adv@one_shot"], ADV_PIX < 0.1)
    assert res["randomness"] == "stochastic" and res["candidates"] == [1, 2]


@functools.cache
def _noisy(randomness, batch_size=B, devices=1):
    return _evaluate(noisy_pixel_model, (scripted_attack, second_attack), randomness=randomness,
                     candidates=(0, 2), batch_size=batch_size, devices=devices)


def test_fixed_aa_on_a_randomised_model_uses_the_stored_purifications():
    for randomness in ("forward_lock",):  # stochastic: the same scoring code, other keys
        res = _noisy(randomness)
        per = res["per_example"]
        frac = lambda p: (p[:, :4] == 0).mean(1)
        # the clean input and x_adv: the very purifications that score the other protocols
        np.testing.assert_allclose(per["clean@average@4"], frac(per["pred_clean"]))
        np.testing.assert_allclose(per["adv@average@4"], frac(per["pred_adv"]))
        want = np.min(np.stack([frac(per["pred_clean"]), frac(per["pred_adv"])]
                               + [frac(per["pred_cand"][:, c]) for c in range(5)]), 0)
        np.testing.assert_allclose(per["adv@fixed_aa@4"], want)
        assert np.all(per["adv@fixed_aa@4"] <= per["adv@average@4"])
        assert res["randomness"] == randomness and res["adv"]["fixed_aa@4"]["num_images"] == B


def test_results_do_not_depend_on_batch_size_or_devices():
    ref = _noisy("forward_lock")["per_example"]  # one chunk of 8 on one device
    for batch_size, devices in [(4, 2)]:  # two chunks of 4, each split over 2 devices
        out = _noisy("forward_lock", batch_size, devices)["per_example"]
        for k in ("pred_clean", "pred_adv", "pred_cand", "adv@fixed_aa@4", "linf"):
            np.testing.assert_array_equal(out[k], ref[k], err_msg=f"{k} {batch_size}")


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_a_clear_error():
    det = lambda x, keys: pixel_model(x)
    with pytest.raises(ValueError, match="randomness"):
        _evaluate(det, scripted_attack, randomness="forward-lock")
    with pytest.raises(ValueError, match="protocol"):
        _evaluate(det, scripted_attack, protocols=("fixed_aa@0",))
    with pytest.raises(ValueError, match="eval_iter"):
        fixed_aa_score(np.zeros((2, 3, 4), int), np.zeros(4, int), 0)
    with pytest.raises(ValueError, match="needs 5 purifications"):
        fixed_aa_score(np.zeros((2, 3, 4), int), np.zeros(4, int), 5)
    # forward_lock needs a defence that splits its noise: refused before any work
    with pytest.raises(ValueError, match="forward_key"):
        _evaluate(det, scripted_attack, randomness="forward_lock")
    dd = DefendedModel(clf, diffdefense(eps_fn, SCHEDULE, num_steps=2, restarts=1,
                                        iterations=0))
    with pytest.raises(ValueError, match="DiffDefense"):
        _evaluate(dd, scripted_attack, randomness="forward_lock")
    with pytest.raises(ValueError, match="separate keys"):
        dd(X, jr.key(0), forward_key=jr.key(1))
    # extra candidates need a fixed_aa protocol and an attack that returns iterates
    with pytest.raises(ValueError, match="fixed_aa"):
        _evaluate(det, scripted_attack, protocols=("one_shot",), candidates=(1,))
    with pytest.raises(ValueError, match="fixed_aa"):
        _evaluate(det, (scripted_attack, second_attack), protocols=("one_shot",))
    with pytest.raises(ValueError, match="iterates"):
        _evaluate(det, functools.partial(scripted_attack, iterates=False), candidates=(1,))
    with pytest.raises(ValueError, match="below 3"):
        _evaluate(det, scripted_attack, candidates=(3,))
    # labels: one non-negative integer per image, in evaluate_robustness and score_adversarial
    with pytest.raises(ValueError, match=r"labels and indices: expected shape \(8,\)"):
        evaluate_robustness(det, scripted_attack, XS, np.zeros(B - 1, np.int64), INDICES,
                            key=KEY, progress=False)
    with pytest.raises(ValueError, match="labels: expected non-negative integer"):
        evaluate_robustness(det, scripted_attack, XS, -np.ones(B, np.int64), INDICES,
                            key=KEY, progress=False)
    with pytest.raises(ValueError, match="y: expected non-negative integer"):
        score_adversarial(det, XS, XS, np.zeros(B, np.float32), INDICES, key=KEY,
                          progress=False)
    with pytest.raises(ValueError, match="candidates"):
        _evaluate(det, scripted_attack, candidates=(-1,))
    # a purifier's forward_key must match its key
    pur = _pur()
    keys = example_keys(jr.key(0), jnp.arange(B))
    with pytest.raises(ValueError, match="forward_key"):
        pur(X, keys, forward_key=jr.key(1))
    with pytest.raises(ValueError, match="forward_key"):
        pur(X, keys, forward_key=keys[:3])
