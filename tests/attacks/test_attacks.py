"""Properties of the attacks on a tiny logistic-regression classifier of 8x8 digits."""

import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _attack_checks import norms

import jaxrob.attacks as ja

TOL = 1e-6


def _accuracy(logits_fn, x, y):
    return float(jnp.mean(jnp.argmax(logits_fn(x, None), axis=1) == y))


# ---------------------------------------------------------------------------------------------
# Losses.


def test_losses_match_hand_computed_values():
    z = jnp.array([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 0.0, -1.0]])
    y = jnp.array([0, 0])
    np.testing.assert_allclose(ja.cw_loss(z, y), [2.0, -4.0])  # max other - true
    np.testing.assert_allclose(ja.cw_loss(z, y, kappa=1.0), [1.0, -4.0])
    # DLR: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3): -(1-3)/(3-1) = 1, -(5-1)/(5-0) = -0.8.
    np.testing.assert_allclose(ja.dlr_loss(z, y), [1.0, -0.8], rtol=1e-6)
    ce = [np.log(np.exp(np.asarray(r, np.float64)).sum()) - r[0] for r in z.tolist()]
    np.testing.assert_allclose(ja.ce_loss(z, y), ce, rtol=1e-6)
    # DLR is invariant to shifting and positively rescaling the logits.
    np.testing.assert_allclose(ja.dlr_loss(3.0 * z + 7.0, y), [1.0, -0.8], rtol=1e-5)


def test_loss_from_logits_is_a_pytree_and_checks_names():
    f = lambda x, key: x.reshape(x.shape[0], -1)[:, :3]
    x, y = jnp.full((2, 1, 3, 1), 0.5), jnp.array([0, 2])
    # the loss name and kappa are static; a plain-function model is a (static) leaf
    assert (jax.tree.structure(ja.loss_from_logits(f, "dlr"))
            == jax.tree.structure(ja.loss_from_logits(f, "dlr")))
    np.testing.assert_allclose(ja.loss_from_logits(f, "cw", kappa=0.5)(x, y, None),
                               ja.cw_loss(f(x, None), y, kappa=0.5))
    with pytest.raises(ValueError, match="loss: expected one of"):
        ja.loss_from_logits(f, "hinge")
    with pytest.raises(ValueError, match="kappa"):
        ja.loss_from_logits(f, "ce", kappa=1.0)
    with pytest.raises(ValueError, match="at least 3 classes"):
        ja.dlr_loss(jnp.zeros((2, 2)), y)


# ---------------------------------------------------------------------------------------------
# Threat model: every iterate in the eps-ball and in [0, 1].


@pytest.mark.parametrize("attack,norm,eps", [("pgd", "linf", 0.1), ("pgd", "l2", 0.7),
                                             ("apgd", "linf", 0.1), ("apgd", "l2", 0.7)])
def test_iterates_stay_in_ball_and_box(model, attack, norm, eps):
    logits_fn, x, y = model
    x, y = x[:16], y[:16]
    if attack == "pgd":
        # Large steps, random start and two restarts: the projection does all the work.
        res = ja.pgd(logits_fn, x, y, jr.key(1), eps=eps, norm=norm, step_size=3 * eps,
                     num_steps=6, random_start=True, num_restarts=2, loss="ce",
                     return_iterates=True)
        assert res.iterates.shape == (2 * 7,) + x.shape
    else:
        res = ja.apgd(logits_fn, x, y, jr.key(1), eps=eps, norm=norm, num_steps=10, loss="dlr",
                      return_iterates=True)
        assert res.iterates.shape == (11,) + x.shape
    for pt in [res.x_adv, *res.iterates]:
        assert norms(pt - x, norm).max() <= eps + TOL
        assert float(pt.min()) >= 0.0 and float(pt.max()) <= 1.0
    # The best iterate is the highest-loss point visited, and its loss is the reported one.
    loss_fn = ja.loss_from_logits(logits_fn, "ce" if attack == "pgd" else "dlr")
    its = res.iterates.reshape((-1,) + x.shape[1:])
    visited = loss_fn(its, jnp.tile(y, res.iterates.shape[0]), None).reshape(-1, x.shape[0])
    np.testing.assert_allclose(res.loss, visited.max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_fn(res.x_adv, y, None), res.loss, rtol=1e-5, atol=1e-6)


def test_fgsm_stays_in_ball_and_raises_a_convex_loss(model):
    logits_fn, x, y = model
    res = ja.fgsm(logits_fn, x, y, jr.key(0), eps=0.05, loss="ce")
    assert norms(res.x_adv - x, "linf").max() <= 0.05 + TOL
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    # CE of a linear model is convex in x and the (clipped) step has g . d >= 0.
    assert np.all(np.asarray(res.loss) >= np.asarray(ja.ce_loss(logits_fn(x, None), y)) - TOL)


# ---------------------------------------------------------------------------------------------
# Strength and monotonicity.


@pytest.mark.parametrize("attack,norm,eps,loss", [("pgd", "linf", 0.3, "ce"),
                                                  ("pgd", "l2", 2.0, "cw"),
                                                  ("apgd", "linf", 0.3, "ce"),
                                                  ("apgd", "l2", 2.0, "dlr")])
def test_accuracy_of_undefended_model_falls_to_zero(model, attack, norm, eps, loss):
    logits_fn, x, y = model
    assert _accuracy(logits_fn, x, y) > 0.9
    if attack == "pgd":
        res = ja.pgd(logits_fn, x, y, jr.key(0), eps=eps, norm=norm, step_size=eps / 4,
                     num_steps=20, loss=loss)
    else:
        res = ja.apgd(logits_fn, x, y, jr.key(0), eps=eps, norm=norm, num_steps=20, loss=loss)
    assert _accuracy(logits_fn, res.x_adv, y) == 0.0


def test_pgd_best_loss_is_non_decreasing_in_num_steps(model):
    logits_fn, x, y = model
    losses = [ja.pgd(logits_fn, x, y, jr.key(3), eps=0.5, norm="l2", step_size=0.1,
                     num_steps=n, random_start=True, loss="cw").loss for n in (1, 3, 6)]
    for before, after in zip(losses, losses[1:], strict=False):
        assert np.all(np.asarray(after) >= np.asarray(before))
    assert np.any(np.asarray(losses[-1]) > np.asarray(losses[0]))  # not vacuous


def test_apgd_checkpoints_follow_the_paper_recursion():
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert ja.apgd_checkpoints(100) == [round(100 * q) for q in p[1:]]
    assert ja.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


# ---------------------------------------------------------------------------------------------
# EoT.


def _noisy_logits(logits_fn):
    return lambda x, key: logits_fn(x + 0.2 * jr.normal(key, x.shape), key)


def test_eot_of_deterministic_model_is_the_plain_gradient(model):
    logits_fn, x, y = model
    loss_fn = ja.loss_from_logits(logits_fn, "ce")
    plain = jax.grad(lambda v: loss_fn(v, y, None).sum())(x)
    for chunk in (None, 2):
        eot = ja.eot_grad(loss_fn, x, y, jr.key(0), samples=8, chunk=chunk)
        np.testing.assert_allclose(eot, plain, atol=TOL, rtol=1e-6)


def test_eot_averages_a_randomised_loss_over_fold_in_keys(model):
    logits_fn, x, y = model
    x, y = x[:8], y[:8]
    loss_fn = ja.loss_from_logits(_noisy_logits(logits_fn), "ce")
    key = jr.key(5)
    one = jax.jit(lambda v, k: (loss_fn(v, y, k), jax.grad(lambda u: loss_fn(u, y, k).sum())(v)))
    losses, grads = zip(*[one(x, jr.fold_in(key, i)) for i in range(8)], strict=True)
    manual = np.mean(np.stack(grads), axis=0)
    loss, eot = ja.eot_value_and_grad(loss_fn, x, y, key, samples=8)
    np.testing.assert_allclose(eot, manual, atol=TOL, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(np.stack(losses), axis=0), rtol=1e-5)
    chunked = ja.eot_grad(loss_fn, x, y, key, samples=8, chunk=2)
    np.testing.assert_allclose(chunked, eot, atol=TOL, rtol=1e-5)
    assert np.abs(np.asarray(grads[0]) - manual).max() > 1e-3  # the noise matters


def _cost(compiled) -> dict:
    c = compiled.cost_analysis()
    return c[0] if isinstance(c, list) else c


def test_eot_sharded_over_8_devices_equals_single_device(model):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxrob.parallel import make_mesh

    logits_fn, x, y = model
    x, y = x[:4], y[:4]
    loss_fn = ja.loss_from_logits(_noisy_logits(logits_fn), "ce")
    key = jr.key(6)
    mesh = make_mesh(8)
    plain = jax.jit(lambda v: ja.eot_value_and_grad(loss_fn, v, y, key, samples=16, chunk=8))
    sharded = jax.jit(lambda v: ja.eot_value_and_grad(loss_fn, v, y, key, samples=16, chunk=8,
                                                      mesh=mesh))
    for a, b in zip(sharded(x), plain(x), strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=1e-5)
    # the samples really are split: the compiled program reduces across devices
    assert "all-reduce" in sharded.lower(x).compile().as_text()
    with pytest.raises(ValueError, match="do not divide the EoT chunk"):
        ja.eot_grad(loss_fn, x, y, key, samples=12, chunk=4, mesh=mesh)
    # a 2-D (data 2, eot 4) mesh: the batch on `data`, each example's samples on `eot`
    mesh2 = make_mesh(8, eot=4)
    xs = jax.device_put(x, NamedSharding(mesh2, P("data")))
    on_eot = jax.jit(lambda v: ja.eot_value_and_grad(loss_fn, v, y, key, samples=16, chunk=8,
                                                     mesh=mesh2))
    for a, b in zip(on_eot(xs), plain(x), strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=1e-5)
    # per device: a quarter of the samples of half the batch (vs all of them on one device)
    flops = lambda f, v: _cost(f.lower(v).compile())["flops"]
    assert flops(on_eot, xs) < 0.25 * flops(plain, x)
    with pytest.raises(ValueError, match="'eot' axis do not divide the EoT chunk of 6"):
        ja.eot_grad(loss_fn, x, y, key, samples=12, chunk=6, mesh=mesh2)
    kw = dict(eps=0.1, num_steps=2, eot_samples=8)
    noisy = _noisy_logits(logits_fn)
    a = ja.pgd(noisy, x, y, key, eot_mesh=mesh, **kw)
    b = ja.pgd(noisy, x, y, key, **kw)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)
    a = ja.apgd(noisy, x, y, key, eot_mesh=mesh, **kw)
    b = ja.apgd(noisy, x, y, key, **kw)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)


def test_pgd_with_eot_on_a_randomised_model_stays_in_ball(model):
    logits_fn, x, y = model
    res = ja.pgd(_noisy_logits(logits_fn), x[:8], y[:8], jr.key(0), eps=0.1, num_steps=3,
                 loss="ce", eot_samples=4, eot_chunk=2, random_start=True)
    assert norms(res.x_adv - x[:8], "linf").max() <= 0.1 + TOL
    assert np.all(np.isfinite(np.asarray(res.loss)))


# ---------------------------------------------------------------------------------------------
# Minimum-norm attacks.


def test_cw_l2_finds_valid_adversarials_and_search_never_hurts(model):
    logits_fn, x, y = model
    x, y = x[:16], y[:16]
    one = ja.cw_l2(logits_fn, x, y, jr.key(0), c=1.0, num_steps=50, learning_rate=0.05)
    more = ja.cw_l2(logits_fn, x, y, jr.key(0), c=1.0, num_steps=50, learning_rate=0.05,
                    binary_search_steps=3)
    for res in (one, more):
        assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
        s = np.asarray(res.success)
        assert s.mean() > 0.9
        pred = np.asarray(jnp.argmax(logits_fn(res.x_adv, None), axis=1))
        assert np.all(pred[s] != np.asarray(y)[s])
        np.testing.assert_allclose(np.asarray(res.norm)[s], norms(res.x_adv - x, "l2")[s],
                                   rtol=1e-4, atol=1e-5)
    # The first search step repeats the fixed-c run, so the search keeps a point at least as close.
    assert np.all(np.asarray(more.norm) <= np.asarray(one.norm))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_reaches_the_boundary(model, norm):
    logits_fn, x, y = model
    res = ja.deepfool(logits_fn, x, y, jr.key(0), norm=norm, num_steps=10)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    s = np.asarray(res.success)
    assert s.mean() > 0.9
    pred = np.asarray(jnp.argmax(logits_fn(res.x_adv, None), axis=1))
    np.testing.assert_array_equal(pred != np.asarray(y), s)
    np.testing.assert_allclose(res.norm, norms(res.x_adv - x, norm), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Compilation and input checks.


def test_pgd_compiles_once_across_calls(model):
    logits_fn, x, y = model
    traces = []

    def counted(x_, key):
        traces.append(1)
        return logits_fn(x_, key)

    run = functools.partial(ja.pgd, counted, num_steps=3, random_start=True, loss="ce")
    run(x[:8], y[:8], jr.key(0), eps=0.1)
    n = len(traces)
    assert n >= 1
    for i in range(3):  # new values, keys and eps: no retrace
        run(x[8 * i + 8: 8 * i + 16], y[8 * i + 8: 8 * i + 16], jr.key(i), eps=0.05 * i)
    assert len(traces) == n


_X = jnp.full((2, 8, 8, 1), 0.5)
_Y = jnp.array([0, 1])
_F = lambda x, key: x.reshape(x.shape[0], -1)[:, :10]


@pytest.mark.parametrize("call,match", [
    (lambda: ja.pgd(_F, _X, _Y, jr.key(0), eps=-0.1, loss="ce"), "eps: expected a finite"),
    (lambda: ja.fgsm(_F, _X, _Y, jr.key(0), eps=float("nan"), loss="ce"), "eps"),
    (lambda: ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, norm="l1", loss="ce"), "norm: expected"),
    (lambda: ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, loss="hinge"), "loss: expected one of"),
    (lambda: ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, num_steps=0, loss="ce"), "num_steps"),
    (lambda: ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, step_size=0.0, loss="ce"), "step_size"),
    (lambda: ja.apgd(_F, 2.0 * _X + 0.1, _Y, jr.key(0), eps=0.1), r"values in \[0.0, 1.0\]"),
    (lambda: ja.apgd(_F, _X[0], _Y, jr.key(0), eps=0.1), "rank 4"),
    (lambda: ja.apgd(_F, _X, _Y[:1], jr.key(0), eps=0.1), r"y: expected shape \(2,\)"),
    (lambda: ja.apgd(_F, _X, _Y, jr.key(0), eps=0.1, rho=1.5), "rho"),
    (lambda: ja.apgd(_F, _X, _Y, jr.key(0), eps=0.1, eot_samples=4, eot_chunk=3),
     "eot_chunk=3 does not divide eot_samples=4"),
    (lambda: ja.eot_grad(lambda x, y, k: x.sum((1, 2, 3)), _X, _Y, jr.key(0), samples=6,
                         chunk=4), "chunk=4 does not divide samples=6"),
    (lambda: ja.cw_l2(_F, _X, _Y, jr.key(0), c=0.0), "c: expected a finite number > 0"),
    (lambda: ja.deepfool(_F, _X, _Y, jr.key(0), norm="l3"), "norm: expected"),
    (lambda: ja.deepfool(_F, _X, _Y, jr.key(0), num_steps=-1), "num_steps"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_loss_must_be_per_example_or_raise_an_error():
    with pytest.raises(ValueError, match="per-example loss of shape"):
        ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, loss=lambda logits, y: logits.sum())


def test_model_must_be_a_logits_fn_and_labels_in_range_errors():
    # the old overload (a loss_fn(x, y, key) as first argument) gets a clear error
    with pytest.raises(TypeError, match=r"logits_fn\(x, key\) -> logits"):
        ja.pgd(lambda x, y, k: x.sum(), _X, _Y, jr.key(0), eps=0.1)
    with pytest.raises(TypeError, match="loss: expected"):
        ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, loss=None)
    for attack in (ja.pgd, ja.apgd, ja.fgsm):
        with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
            attack(_F, _X, jnp.array([0, 10]), jr.key(0), eps=0.1)
    for attack in (ja.cw_l2, ja.deepfool):
        with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
            attack(_F, _X, jnp.array([3, 12]), jr.key(0))


def test_custom_loss_callable():
    # a callable loss(logits, y) is maximised like the named ones
    ce = lambda logits, y: ja.ce_loss(logits, y)
    a = ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, num_steps=2, loss=ce)
    b = ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, num_steps=2, loss="ce")
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)


def test_new_parameters_of_the_same_shapes_do_not_recompile():
    from jaxrob.attacks._pgd import _pgd
    from jaxrob.models import Classifier, SmallCNN

    module = SmallCNN(num_classes=10, features=(4,), hidden=8)
    x = jr.uniform(jr.key(3), (2, 8, 8, 1))
    clf = [Classifier(module, module.init(jr.key(s), x)) for s in (0, 1)]
    before = _pgd.cache_size()
    losses = [ja.pgd(c, x, _Y, jr.key(0), eps=0.1, num_steps=2).loss for c in clf]
    for c in clf:
        np.testing.assert_array_less(0.0, jnp.abs(c(x)).max())
    assert _pgd.cache_size() == before + 1  # one compilation for both parameter sets
    assert not np.allclose(losses[0], losses[1])
