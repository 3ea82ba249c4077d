"""DiffDefense reconstruction: restarts, keys, gradients (exact, reference, unrolled, BPDA), and
the detection metrics (ROC / AUC / detection rate at a fixed false-positive rate).

Most tests use a closed-form eps-model (compiles in seconds: the defence nests a gradient of the
reverse process inside its optimiser, and the attack-facing gradient differentiates that again);
the gradient-fidelity check of the reverse process uses a tiny UNet.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob._keys as tags
import jaxrob.diffusion as jd
from jaxrob.evaluation import detection_rate, roc_auc, roc_curve
from jaxrob.models import DiffusionModel, unet_from_config
from jaxrob.purify import (
    DefendedModel,
    DiffDefense,
    diffdefense,
    example_keys,
    reference_learning_rate,
)

SCHED = jd.linear_schedule(1000)
X = jr.uniform(jr.key(0), (3, 8, 8, 1), minval=0.05, maxval=0.95)


def toy_eps(x, step):
    """The optimal eps of data N(0, 0.25 I) (in [-1, 1] space) plus a small nonlinear term."""
    abar = SCHED.alphas_cumprod[step].reshape(-1, 1, 1, 1)
    sd = jnp.sqrt(1.0 - abar)
    return sd * x / (0.25 * abar + 1.0 - abar) + 0.3 * sd * jnp.tanh(jnp.roll(x, 1, axis=1))


def toy_eps_const(x, step):
    return jax.lax.stop_gradient(toy_eps(x, step))


def _dd(eps=toy_eps, **kw):
    kw = {"num_steps": 4, "restarts": 3, "iterations": 2, **kw}
    return diffdefense(eps, SCHED, **kw)


def _tiny_unet(batch):
    """A UNet for 8x8 single-channel images with random weights. Not ``module.init``: its
    initialisers alone take 15-50 s to compile on a loaded 2-core CPU; only the shapes are
    needed."""
    m = unet_from_config("digits", ch=4, ch_mult=(1,), num_groups=2, dropout=0.0,
                         attn_resolutions=())
    shapes = jax.eval_shape(m.init, jr.key(0), jnp.zeros((batch, 8, 8, 1)),
                            jnp.zeros((batch,), jnp.int32))
    leaves, treedef = jax.tree.flatten(shapes)
    v = [0.3 * jr.normal(jr.fold_in(jr.key(6), i), leaf.shape) for i, leaf in enumerate(leaves)]
    return DiffusionModel(m, jax.tree.unflatten(treedef, v), SCHED)


def _init_z(key, r, shape):
    return jr.normal(jr.fold_in(jr.fold_in(key, tags.RECON_INIT), r), shape)


def test_zero_iterations_keep_the_best_random_initialisation():
    d = _dd(iterations=0, restarts=4)
    key = jr.key(1)
    rec = jax.jit(d.reconstruct)(X, key)
    zs = jnp.stack([_init_z(key, r, X.shape) for r in range(4)])
    outs = jax.jit(jax.vmap(lambda z: d.decode(z, key)))(zs)  # eta = 0: the key is unused
    errs = jnp.mean(jnp.square(outs - X[None]), axis=(2, 3, 4))
    best = jnp.argmin(errs, axis=0)
    b = jnp.arange(X.shape[0])
    np.testing.assert_array_equal(rec.restart, best)
    np.testing.assert_allclose(rec.x, outs[best, b], atol=1e-6)
    np.testing.assert_allclose(rec.z, zs[best, b], atol=1e-6)
    np.testing.assert_allclose(rec.error, errs[best, b], rtol=1e-5)
    assert float(rec.x.min()) >= 0 and float(rec.x.max()) <= 1
    assert d.nfe == 4 * 1 * 4 and d.nfe_vjp == 0


@pytest.mark.parametrize("per_example", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_more_restarts_never_raise_the_error(per_example):
    key = example_keys(jr.key(2), jnp.arange(3)) if per_example else jr.key(2)
    errors = [np.asarray(jax.jit(_dd(restarts=r).reconstruct)(X, key).error) for r in (1, 4)]
    for fewer, more in zip(errors[:-1], errors[1:], strict=True):
        assert np.all(more <= fewer + 1e-7)
    assert np.any(errors[-1] < errors[0])  # a later restart won somewhere


def test_adam_iterations_lower_the_reconstruction_error():
    key = jr.key(3)
    e0 = jax.jit(_dd(iterations=0, restarts=1).reconstruct)(X, key).error
    e3 = jax.jit(_dd(iterations=3, restarts=1, learning_rate=0.1).reconstruct)(X, key).error
    assert np.all(np.asarray(e3) < np.asarray(e0))


def test_reference_learning_rate_is_the_reference_codes_step_decay():
    # its schedulerLR: the optimiser starts at 0.02, then lr = 25 * 0.1 ** (k / ceil(0.8 L))
    rates = [float(reference_learning_rate(4)(k)) for k in range(4)]
    np.testing.assert_allclose(rates, [0.02, 25 * 0.1 ** 0.25, 25 * 0.1 ** 0.5,
                                       25 * 0.1 ** 0.75], rtol=1e-6)
    assert float(reference_learning_rate(10)(8)) == pytest.approx(25 * 0.1)  # ceil(8.0) = 8
    dd = _dd(learning_rate="reference")
    assert dd.learning_rate == "reference" and dd.manifest()["learning_rate"] == "reference"
    # the named option is that schedule: the same reconstruction as passing it explicitly
    key = jr.key(3)
    a = _dd(restarts=1, learning_rate="reference").reconstruct(X, key).error
    b = _dd(restarts=1, learning_rate=reference_learning_rate(2)).reconstruct(X, key).error
    np.testing.assert_array_equal(a, b)


def test_per_example_keys_make_results_independent_of_batch_size():
    d = jax.jit(_dd(eta=1.0))
    keys = example_keys(jr.key(4), jnp.arange(3))
    full = d(X, keys)
    single = jnp.concatenate([d(X[i:i + 1], keys[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(full, single, atol=1e-6)
    other = d(X, example_keys(jr.key(5), jnp.arange(3)))
    assert not np.allclose(full, other)


def test_exact_z_gradient_of_a_tiny_unet_matches_finite_differences():
    x = X[:2]
    d = diffdefense(_tiny_unet(2), num_steps=3)
    key = jr.key(7)
    z = jr.normal(jr.key(8), x.shape)
    u = jr.normal(jr.key(9), x.shape)
    h = 1e-3
    f = lambda zz: jnp.sum(d.objective(zz, x, key))

    @jax.jit  # one compilation: the gradient and both finite-difference points
    def both(zz):
        return jax.grad(f)(zz), f(zz + h * u), f(zz - h * u)

    g, f_plus, f_minus = both(z)
    np.testing.assert_allclose(jnp.vdot(g, u), (f_plus - f_minus) / (2 * h), rtol=2e-2)


def test_reference_z_gradient_holds_the_network_constant():
    key = jr.key(10)
    z = jr.normal(jr.key(11), X.shape)
    grad = lambda d: jax.jit(jax.grad(lambda zz: jnp.sum(d.objective(zz, X, key))))(z)
    exact = _dd()
    ref = _dd(z_gradient="reference")
    const = _dd(eps=toy_eps_const)  # "exact" gradient of a network with stop_gradient output
    np.testing.assert_allclose(ref.objective(z, X, key), exact.objective(z, X, key), rtol=1e-6)
    g_exact, g_ref, g_const = grad(exact), grad(ref), grad(const)
    np.testing.assert_allclose(g_ref, g_const, rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(g_ref - g_exact) > 0.1 * np.linalg.norm(g_exact)
    assert ref.nfe_vjp == 0 and exact.nfe_vjp == 3 * 2 * 4


def test_gradient_through_the_unrolled_optimisation_with_and_without_remat():
    key = jr.key(12)
    u = jr.normal(jr.key(13), X.shape)
    def grad(d):
        return jax.jit(jax.grad(lambda x: jnp.vdot(d(x, key), u)))(X)
    g_remat = grad(_dd(remat=True, learning_rate=0.1))
    g_plain = grad(_dd(remat=False, learning_rate=0.1))
    assert np.all(np.isfinite(g_remat)) and float(jnp.abs(g_remat).max()) > 0
    np.testing.assert_allclose(g_remat, g_plain, rtol=1e-4, atol=1e-6 * float(
        jnp.abs(g_plain).max()))
    # without iterations the output depends on x only through the choice of restart
    np.testing.assert_array_equal(grad(_dd(iterations=0)), 0.0)


def test_undifferentiated_call_skips_the_inner_recomputation_not_the_values():
    # inner_remat=False: the plain call's optimiser gradient keeps the reverse pass (no
    # checkpoint in its program); under jvp / grad the bounded version (checkpoints) takes over
    key = jr.key(12)
    fast, inner = _dd(learning_rate=0.1, inner_remat=False), _dd(learning_rate=0.1)
    plain = _dd(learning_rate=0.1, remat=False)
    checkpoints = lambda d: str(jax.make_jaxpr(d.reconstruct)(X, key)).count("remat")
    assert checkpoints(plain) == 0 and checkpoints(inner) > 0
    assert "custom_jvp_call" in str(jax.make_jaxpr(fast.reconstruct)(X, key))
    recs = [jax.jit(d.reconstruct)(X, key) for d in (fast, inner, plain)]
    for r in recs[1:]:
        np.testing.assert_allclose(r.x, recs[0].x, atol=1e-6)
        np.testing.assert_allclose(r.error, recs[0].error, rtol=1e-5)
        np.testing.assert_array_equal(r.restart, recs[0].restart)
    # forward mode through the switch: the jvp is the gradient's projection
    u = jr.normal(jr.key(13), X.shape)
    jvp = jax.jit(lambda x: jax.jvp(lambda y: fast(y, key), (x,), (u,))[1])(X)
    g = jax.jit(jax.grad(lambda x: jnp.vdot(plain(x, key), u)))(X)
    np.testing.assert_allclose(jnp.vdot(jvp, u), jnp.vdot(g, u), rtol=1e-4)
    assert fast.manifest()["inner_remat"] is False and inner.manifest()["inner_remat"] is True
    assert plain.manifest()["inner_remat"] is False  # None follows remat


def test_bpda_backward_is_the_identity_behind_a_defended_model():
    key = jr.key(14)
    exact = _dd()
    bpda = exact.replace(gradient="bpda")
    assert isinstance(bpda, DiffDefense) and bpda.chain is not None
    u = jr.normal(jr.key(15), X.shape)
    value_and_grad = jax.jit(jax.value_and_grad(lambda x: jnp.vdot(bpda(x, key), u)))
    val, g = value_and_grad(X)
    np.testing.assert_allclose(g, u, atol=1e-6)
    np.testing.assert_allclose(val, jnp.vdot(jax.jit(exact)(X, key), u), rtol=1e-5)
    w = jr.normal(jr.key(16), (64, 10))
    clf = lambda x, k: x.reshape(x.shape[0], -1) @ w
    defended = DefendedModel(clf, bpda)
    gl = jax.jit(jax.grad(lambda x: jnp.sum(defended(x, key)[:, 0])))(X)
    np.testing.assert_allclose(gl, jnp.broadcast_to(w[:, 0].reshape(1, 8, 8, 1), X.shape),
                               atol=1e-5)
    assert defended.manifest()["purifier"]["gradient"] == "bpda"


def test_bad_options_and_inputs_raise_clear_errors():
    for kw, match in [({"restarts": 0}, "restarts"), ({"restarts": 2.0}, "restarts"),
                      ({"iterations": -1}, "iterations"), ({"learning_rate": 0.0},
                                                           "learning_rate"),
                      ({"betas": (1.0, 0.9)}, "betas"), ({"num_steps": 0}, "num_steps"),
                      ({"num_steps": 2000}, "num_steps"), ({"eta": -1.0}, "eta"),
                      ({"z_gradient": "adjoint"}, "z_gradient"),
                      ({"gradient": "surrogate"}, "gradient"), ({"output": "tanh"}, "output")]:
        with pytest.raises(ValueError, match=match):
            _dd(**kw)
    with pytest.raises(TypeError, match="unknown option"):
        DiffDefense.create(toy_eps, SCHED, restart=3)
    with pytest.raises(TypeError, match="schedule"):
        diffdefense(toy_eps)
    d = _dd()
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        d(X + 1.0, jr.key(0))
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        d.replace(gradient="bpda")(X - 1.0, jr.key(0))
    with pytest.raises(ValueError, match="rank 4"):
        d(X[0], jr.key(0))
    with pytest.raises(ValueError, match="keys"):
        d(X, example_keys(jr.key(0), jnp.arange(2)))
    with pytest.raises(ValueError, match="derived"):
        d.replace(chain=SCHED)
    # a UNet built for 8x8 single-channel images: other shapes fail before any work
    unet = diffdefense(_tiny_unet(3), num_steps=2, restarts=1, iterations=1)
    with pytest.raises(ValueError, match="does not fit the diffusion model"):
        unet(jnp.full((2, 8, 8, 3), 0.5), jr.key(0))
    with pytest.raises(ValueError, match="does not fit the diffusion model"):
        unet(jnp.full((2, 6, 6, 1), 0.5), jr.key(0))
    for fpr in (0.0, 1.0, -0.1, 1.5, "a"):
        with pytest.raises(ValueError, match="fpr"):
            detection_rate([0.1, 0.2], [0.3], fpr=fpr)
    with pytest.raises(ValueError, match="clean_scores"):
        roc_auc([], [0.3])
    with pytest.raises(ValueError, match="attacked_scores"):
        roc_curve([0.1], [[0.3]])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0.1, np.nan], [0.3])


def test_defence_is_a_pytree_over_its_parameters():
    from jaxrob._jit import filter_jit

    d = _dd()
    leaves = jax.tree.leaves(d)  # a plain-function eps_fn is a static leaf, the rest arrays
    assert [leaf for leaf in leaves if not isinstance(leaf, jax.Array)] == [toy_eps]
    f = filter_jit(lambda dd, x: dd(x, jr.key(0)))
    f(d, X)
    f(d.replace(eps_fn=toy_eps), X)
    assert f.cache_size() == 1
    man = d.manifest()
    assert man["restarts"] == 3 and man["iterations"] == 2 and man["steps"] == 4
    assert man["z_gradient"] == "exact" and man["nfe_forward"] == 3 * 3 * 4


def test_roc_auc_of_perfect_random_and_tied_detectors():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=2000)
    assert roc_auc(clean, clean + 100.0) == 1.0
    assert roc_auc(clean, clean - 100.0) == 0.0
    assert abs(roc_auc(clean, rng.normal(size=2000)) - 0.5) < 0.03
    assert roc_auc(np.zeros(5), np.zeros(7)) == 0.5
    fpr, tpr, thr = roc_curve(clean, clean + 1.0)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and thr[0] == np.inf
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # ties count one half (Mann-Whitney): attacked = [1, 2] vs clean = [1, 0]
    assert roc_auc([1.0, 0.0], [1.0, 2.0]) == pytest.approx(0.875)
    metrics = pytest.importorskip("sklearn.metrics")
    a, c = rng.integers(0, 5, 300).astype(float), rng.integers(1, 6, 200).astype(float)
    labels = np.r_[np.zeros(300), np.ones(200)]
    assert roc_auc(a, c) == pytest.approx(metrics.roc_auc_score(labels, np.r_[a, c]))


def test_detection_rate_at_a_false_positive_rate_fixed_on_clean_scores():
    clean, attacked = np.arange(100.0), np.arange(100.0) + 50.0
    det = detection_rate(clean, attacked, fpr=0.1)
    assert det.threshold == 89.0 and det.fpr == pytest.approx(0.1)
    assert det.rate == pytest.approx(0.6)
    det = detection_rate(clean, attacked, fpr=0.29)  # 0.29 * 100 is 28.999... in floats
    assert det.fpr == pytest.approx(0.29)
    det = detection_rate(np.ones(10), np.r_[np.ones(5), 2 * np.ones(5)], fpr=0.5)
    assert det.fpr == 0.0 and det.rate == 0.5  # ties at the threshold are not flagged
