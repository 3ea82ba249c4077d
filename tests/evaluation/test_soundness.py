"""Soundness checks of an evaluation (jaxrob.evaluation.soundness_checks) and the scoring of
given adversarial inputs (score_adversarial).

Models are a tanh-linear classifier, behind a quantiser (gradient masking) or behind Gaussian
input noise drawn from the key (a randomised defence): every run compiles in a second or two;
Square (a loop over queries) is the slowest. One mesh of one device, one chunk per run.
(The key plumbing of real purifiers under every randomness mode is tested in
test_dwbox_fixed_aa.py; the soundness runs go through the same robust_scores.)
"""

import json

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from jaxrob.attacks import pgd
from jaxrob.evaluation import CHECKS, evaluate_robustness, score_adversarial, soundness_checks
from jaxrob.parallel import make_mesh
from jaxrob.purify import DefendedModel

N = 16
X = jr.uniform(jr.key(0), (N, 8, 8, 1), minval=0.1, maxval=0.9)
W = jr.normal(jr.key(2), (64, 10)) * 0.5
INDICES = np.arange(200, 200 + N)
MESH = make_mesh(1)
EPS = 0.03


def clf(x, key=None):
    return jnp.tanh(x.reshape(x.shape[0], -1) - 0.5) @ W


Y = jnp.argmax(clf(X), -1)  # the classifier is right on every clean image


def quantise(x, key):  # a non-differentiable "defence": zero gradient almost everywhere
    return jnp.round(x * 8) / 8


def noise(x, key):  # a randomised "purifier": Gaussian noise from the key (one or one per image)
    if jnp.ndim(key) == 0:
        return jnp.clip(x + 0.1 * jr.normal(key, x.shape), 0.0, 1.0)
    return jax.vmap(lambda xi, k: noise(xi[None], k)[0])(x, key)


HONEST = DefendedModel(clf, None)  # undefended: bare classifier == the model
MASKED = DefendedModel(clf, quantise)  # bare classifier: clf
RANDOMISED = DefendedModel(clf, noise)


def _checks(model, **kw):
    # PGD's default step 2.5 eps / T, given explicitly: a traced step size (like eps), so the
    # runs of the honest model and of the too-few-iterations test share their compilations
    kw.setdefault("num_steps", 5)
    kw.setdefault("step_size", 2.5 * kw.get("eps", EPS) / kw["num_steps"])
    kw.setdefault("square_queries", 200)
    return soundness_checks(model, X, Y, INDICES, key=jr.key(1), eps=kw.pop("eps", EPS),
                            mesh=MESH, **kw)


@pytest.fixture(scope="module")
def honest():
    return _checks(HONEST)


def test_an_honest_undefended_model_passes_every_check(honest):
    assert honest["verdicts"] == {c: "pass" for c in CHECKS}, honest["verdicts"]
    assert honest["verdict"] == "pass"
    checks = honest["checks"]
    # (a) at Linf 0.5 nothing survives; (b) 4x the iterations stay inside the interval
    assert checks["large_eps"]["eps"] == 0.5
    assert checks["large_eps"]["adv"]["accuracy"] <= 0.1
    it = checks["iterations"]
    assert it["num_steps"] == 20 and it["eot_samples"] == 1  # deterministic: no EoT scaling
    lo, hi = it["base"]["ci95"]
    assert lo <= it["stronger"]["accuracy"] <= hi
    # (c) Square is not stronger than PGD on a (tanh-)linear model; (d) undefended: the
    # transfer attack is the adaptive attack itself (same keys inside, deterministic)
    assert checks["gradient_free"]["square"]["accuracy"] >= honest["base"]["adv"]["accuracy"]
    assert checks["transfer"]["undefended"]
    assert checks["transfer"]["transfer"] == honest["base"]["adv"]
    # (e) deterministic model: the re-measure agrees example by example
    flags = checks["flags"]
    assert not honest["probe"]["looks_randomised"] and flags["remeasure"]["agree"] == N
    assert flags["perturbation"]["max_distance"] <= EPS + 1e-6
    # the base attack is a real attack: it breaks some of the (all correct) clean images
    assert honest["base"]["clean"]["accuracy"] == 1.0 > honest["base"]["adv"]["accuracy"]


def test_results_are_json_serialisable_with_wall_times(honest):
    again = json.loads(json.dumps(honest))
    assert again == honest
    for name in CHECKS:
        assert honest["checks"][name]["wall_s"] > 0
        assert honest["checks"][name]["verdict"] in ("pass", "fail", "inconclusive")
        assert isinstance(honest["checks"][name]["reason"], str)
    assert honest["indices"] == INDICES.tolist() and honest["num_images"] == N
    assert honest["settings"]["eps"] == EPS and honest["settings"]["attack"] == "pgd"
    assert honest["wall_s"] >= sum(honest["checks"][c]["wall_s"] for c in CHECKS)


def test_a_gradient_masking_defence_fails_the_gradient_free_and_transfer_checks():
    res = _checks(MASKED, checks=("gradient_free", "transfer"))
    assert set(res["verdicts"]) == {"gradient_free", "transfer"}
    # PGD sees a zero gradient: it does not move, the robust accuracy stays the clean one
    assert res["base"]["adv"]["accuracy"] == res["base"]["clean"]["accuracy"]
    assert res["verdicts"]["gradient_free"] == "fail"
    assert res["verdicts"]["transfer"] == "fail" and res["verdict"] == "fail"
    sq = res["checks"]["gradient_free"]
    assert sq["broken_only_by_square"] >= 1 and sq["broken_only_by_base"] == 0
    assert not res["checks"]["transfer"]["undefended"]


def test_too_few_iterations_are_flagged_as_not_converged():
    # 5 steps of eps/20 reach a quarter of the ball; 20 steps reach all of it
    res = _checks(HONEST, eps=0.06, step_size=0.003, checks=("iterations",))
    it = res["checks"]["iterations"]
    assert res["verdicts"] == {"iterations": "fail"}
    assert "not converged" in it["reason"]
    assert it["stronger"]["accuracy"] < it["base"]["ci95"][0] and it["drop"] > 0
    assert res["settings"]["base_step_size"] == pytest.approx(0.003)


def test_a_randomised_model_attacked_without_eot_is_flagged():
    res = _checks(RANDOMISED, eot_samples=1, factor=2, checks=("flags", "iterations"))
    assert res["probe"]["looks_randomised"] and res["probe"]["randomness"] > 1e-4
    flags = res["checks"]["flags"]
    assert flags["randomised"]["verdict"] == "fail" and res["verdicts"]["flags"] == "fail"
    assert flags["perturbation"]["verdict"] == "pass"
    # the stronger run scales the EoT samples too, the model being randomised
    assert res["checks"]["iterations"]["eot_samples"] == 2


def test_score_adversarial_matches_the_evaluation_of_the_same_attack():
    attack = lambda m, x, y, k: pgd(m, x, y, k, eps=EPS, num_steps=3)
    ev = evaluate_robustness(HONEST, attack, X, Y, INDICES, key=jr.key(3), batch_size=8,
                             mesh=MESH, keep_x_adv=True, progress=False, self_check=0)
    sc = score_adversarial(HONEST, X, ev["per_example"]["x_adv"], Y, INDICES, key=jr.key(3),
                           batch_size=8, mesh=MESH, progress=False)
    for k in ("pred_clean", "pred_adv", "linf", "adv@one_shot"):
        np.testing.assert_allclose(sc["per_example"][k], ev["per_example"][k], atol=1e-6,
                                   err_msg=k)
    assert sc["adv"] == ev["adv"] and sc["self_check"]["mismatches"] == []


def test_bad_input_raises_before_any_work():
    with pytest.raises(ValueError, match="checks"):
        _checks(HONEST, checks=("large_eps", "gradients"))
    with pytest.raises(ValueError, match="checks"):
        _checks(HONEST, checks=())
    for eps in (0.0, -0.1):
        with pytest.raises(ValueError, match="eps"):
            _checks(HONEST, eps=eps)
    with pytest.raises(ValueError, match="large_eps"):
        _checks(HONEST, large_eps=0.01)
    with pytest.raises(ValueError, match="factor"):
        _checks(HONEST, factor=1)
    with pytest.raises(ValueError, match="attack"):
        _checks(HONEST, attack="fgsm")
    with pytest.raises(ValueError, match="protocol"):
        _checks(HONEST, protocol="best_of@2")
    with pytest.raises(ValueError, match="randomness"):
        _checks(HONEST, randomness="frozen")
    with pytest.raises(ValueError, match="bare"):  # a plain function: no bare classifier known
        _checks(lambda x, k: clf(x), checks=("transfer",))
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        soundness_checks(HONEST, X * 2, Y, INDICES, key=jr.key(0), eps=EPS)
    with pytest.raises(ValueError, match="x_adv"):
        score_adversarial(HONEST, X, X[:4], Y, INDICES, key=jr.key(0))


def heavy_noise(x, key):  # noise large enough that the clean predictions depend on the key
    if jnp.ndim(key) == 0:
        return jnp.clip(x + 0.6 * jr.normal(key, x.shape), 0.0, 1.0)
    return jax.vmap(lambda xi, k: heavy_noise(xi[None], k)[0])(x, key)


@pytest.mark.parametrize("randomness", ["fixed", "stochastic"])
def test_under_fixed_randomness_every_check_attacks_the_base_runs_model(randomness):
    # DW-box: the key is the model (its fixed noise); every run of the checks must face the
    # fixed-noise model the base attack faced, else a check compares different models. The
    # clean accuracy each run records is that model's: equal across runs when shared.
    res = _checks(DefendedModel(clf, heavy_noise), checks=("large_eps", "iterations"),
                  randomness=randomness, eot_samples=1, factor=2)
    clean_base = res["base"]["clean"]["accuracy"]
    clean_large = res["checks"]["large_eps"]["clean"]["accuracy"]
    if randomness == "fixed":
        assert res["settings"]["keys"].startswith("shared")
        assert clean_large == clean_base
        # same model, same step, no random start: the stronger run's first iterates are the
        # base run's and the best (highest-loss) iterate is kept -- it breaks at least as many
        assert res["checks"]["iterations"]["stronger"]["accuracy"] <= res["base"]["adv"][
            "accuracy"]
    else:  # fresh noise per run: the runs' clean accuracies differ (the test has power)
        assert res["settings"]["keys"] == "per run"
        assert clean_large != clean_base
