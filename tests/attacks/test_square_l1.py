"""L1 Square (AutoAttack's L1 branch, Croce & Hein 2021): the pattern, the start, the strength,
and the original's robust accuracy next to ours on the same weights.

The ball / box / query-budget properties of every queried point are in
``test_square_ead_targeted.py`` (parametrised over the three norms)."""

import os
import pathlib
import sys

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _attack_checks import norms, predictions

import jaxrob
import jaxrob.attacks as ja
from jaxrob.attacks._square import square_eta

REPO = pathlib.Path(__file__).resolve().parents[2]
REFERENCE = pathlib.Path(os.environ.get("JAXROB_AUTOATTACK_REFERENCE",
                                        REPO.parent / "ext" / "auto-attack"))
TOL = 1e-5


@pytest.mark.parametrize("s", [1, 2, 3, 5, 8, 9])
def test_square_l1_eta_is_the_steeper_nested_rectangle_pattern(s):
    """Unit L1 norm; top half >= 0, bottom half < 0; each half peaks at its centre; the
    ``1 / (k + 1)^4`` weights make it more concentrated than the L2 pattern."""
    eta = square_eta(s, "l1")
    assert eta.shape == (s, s)
    assert np.abs(eta).sum() == pytest.approx(1.0)
    assert np.all(eta[: s // 2] > 0) and np.all(eta[s // 2:] < 0)
    bottom = -eta[s // 2:]
    assert bottom.max() == bottom[(s - s // 2) // 2, s // 2]
    if s >= 5:  # the centre's share of the L1 mass exceeds the L2 pattern's
        l2 = np.abs(square_eta(s, "l2"))
        assert bottom.max() > (l2 / l2.sum())[s // 2:].max()


def test_square_l1_start_spends_the_budget_in_the_box(model):
    """Query 1 (the tiled start) is projected onto the L1 ball cap the box: on the examples
    classified correctly it uses the whole radius (the tiles carry more mass than eps)."""
    logits_fn, x, y = model
    eps = 2.0
    res = ja.square(logits_fn, x, y, jr.key(3), eps=eps, norm="l1", n_queries=2)
    l1 = norms(res.x_adv - x, "l1")
    started = np.asarray(res.queries) == 2
    assert started.sum() > x.shape[0] // 2
    np.testing.assert_allclose(l1[started], eps, rtol=1e-4)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    np.testing.assert_array_equal(np.asarray(res.x_adv)[~started], np.asarray(x)[~started])


def test_square_l1_breaks_the_undefended_mnist_classifier(data_dir):
    del data_dir
    f = jaxrob.models.load(str(REPO / "checkpoints" / "mnist_classifier"))
    data = jaxrob.data.load_dataset("mnist", "test[:32]")
    x, y = jnp.asarray(data.images), jnp.asarray(data.labels, jnp.int32)
    assert np.mean(predictions(f, x) == np.asarray(y)) > 0.9
    res = ja.square(f, x, y, jr.key(0), eps=30.0, norm="l1", n_queries=300)
    assert norms(res.x_adv - x, "l1").max() <= 30.0 * (1 + TOL) + TOL
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert np.mean(predictions(f, res.x_adv) == np.asarray(y)) <= 1 / 32
    assert np.asarray(res.queries).max() <= 300


@pytest.mark.torch
def test_square_l1_robust_accuracy_matches_the_originals(model):
    """fra31/auto-attack's ``SquareAttack(norm="L1")`` ($JAXROB_AUTOATTACK_REFERENCE or
    ../ext/auto-attack) on the same softmax regression: the same budget (the original's
    ``n_queries`` counts the updates after its start, ours the clean check and the start too),
    robust accuracies averaged over five seeds within 0.06 of each other (their random draws
    differ; the seed-to-seed spread is about 0.05 on 64 images)."""
    import torch

    if not (REFERENCE / "autoattack" / "square.py").is_file():
        pytest.skip(f"no fra31/auto-attack checkout at {REFERENCE}")
    sys.path.insert(0, str(REFERENCE))
    try:
        from autoattack.square import SquareAttack
    finally:
        sys.path.remove(str(REFERENCE))
    logits_fn, x, y = model
    z = np.asarray(logits_fn(x, None))
    # logits_fn is x.reshape(B, -1) @ w + b: recover w and b from the model itself
    eye = jnp.eye(64).reshape(64, 8, 8, 1)
    b = np.asarray(logits_fn(jnp.zeros((1, 8, 8, 1)), None))[0]
    w = np.asarray(logits_fn(eye, None)) - b[None]
    np.testing.assert_allclose(np.asarray(x).reshape(x.shape[0], -1) @ w + b, z, atol=1e-4)
    w_t, b_t = torch.tensor(w), torch.tensor(b)
    torch_model = lambda xx: xx.permute(0, 2, 3, 1).reshape(xx.shape[0], -1) @ w_t + b_t
    x_t = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    y_t = torch.tensor(np.asarray(y)).long()
    eps, n_queries = 3.0, 100
    ours, theirs = [], []
    for seed in range(5):
        attack = SquareAttack(torch_model, norm="L1", n_queries=n_queries - 2, eps=eps,
                              p_init=0.8, seed=seed, device="cpu")
        adv = attack.perturb(x_t, y_t)
        assert float((adv - x_t).abs().flatten(1).sum(1).max()) <= eps * (1 + TOL)
        theirs.append(float((torch_model(adv).argmax(1) == y_t).float().mean()))
        res = ja.square(logits_fn, x, y, jr.key(seed), eps=eps, norm="l1", n_queries=n_queries)
        ours.append(float(np.mean(predictions(logits_fn, res.x_adv) == np.asarray(y))))
    clean = float(np.mean(predictions(logits_fn, x) == np.asarray(y)))
    assert max(ours) < clean - 0.2  # not vacuous: the attack works at this eps
    assert abs(np.mean(ours) - np.mean(theirs)) <= 0.06, (ours, theirs)
