"""Protocols, intervals, fixed vs stochastic randomness, sharding and resumable runs."""

import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _variables import random_variables

import jaxrob.diffusion as jd
from jaxrob.attacks import pgd
from jaxrob.evaluation import (
    ChunkStore,
    evaluate_robustness,
    parse_protocol,
    protocol_scores,
    robust_scores,
    score_predictions,
    summarize,
    wilson_interval,
)
from jaxrob.models import DiffusionModel, unet_from_config
from jaxrob.parallel import make_mesh
from jaxrob.purify import diffpure, example_keys, purified_logits

N = 16
X = jr.uniform(jr.key(0), (N, 8, 8, 1), minval=0.1, maxval=0.9)
W = jr.normal(jr.key(2), (64, 10)) * 0.5


def logits_fn(x, key=None):
    return jnp.tanh(x.reshape(x.shape[0], -1) - 0.5) @ W


Y = jnp.argmax(logits_fn(X), -1)  # the undefended model is correct on every clean image


def _defended():
    m = unet_from_config("digits", ch=8, ch_mult=(1, 2), num_groups=4, dropout=0.0,
                         attn_resolutions=(), fast_vjp=True)
    v = random_variables(m, X[:2], jnp.zeros((2,), jnp.int32), seed=1)
    pur = diffpure(DiffusionModel(m, v, jd.linear_schedule()), t_star=0.2, num_steps=2)
    return purified_logits(logits_fn, pur)


DEFENDED = _defended()


def attack(model, x, y, key):
    return pgd(model, x, y, key, eps=0.1, num_steps=2, loss="ce", eot_samples=2)


def test_parse_protocol():
    assert parse_protocol("one_shot") == ("one_shot", 1)
    assert parse_protocol("worst_of@10") == ("worst_of", 10)
    assert parse_protocol("average@3") == ("average", 3)
    for bad in ["one_shot@2", "worst_of", "worst_of@0", "best_of@3", "majority"]:
        with pytest.raises(ValueError, match="protocol"):
            parse_protocol(bad)


def test_protocol_semantics_on_a_key_dependent_model():
    # the model is right for an example unless the key's first bit (per sample) is set
    def model(x, keys):
        flip = jax.vmap(lambda k: jr.bernoulli(k, 0.5))(keys)
        lg = jax.nn.one_hot(jnp.where(flip, 1, 0), 3)
        return lg

    x, y = X[:8], jnp.zeros((8,), jnp.int32)
    keys = example_keys(jr.key(3), jnp.arange(8))
    _, correct = protocol_scores(model, x, y, keys, protocol="average@5")
    correct = np.asarray(correct)
    assert correct.shape == (5, 8)
    for proto, expect in [("worst_of@5", correct.all(0)), ("average@5", correct.mean(0)),
                          ("majority_vote@5", correct.sum(0) >= 3)]:
        score, c2 = protocol_scores(model, x, y, keys, protocol=proto, chunk=2)
        np.testing.assert_array_equal(c2, correct)
        np.testing.assert_allclose(score, expect.astype(np.float32))
    one, _ = protocol_scores(model, x, y, keys, protocol="one_shot")
    np.testing.assert_array_equal(one, correct[0])


def test_intervals():
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0 < hi < 0.1
    lo, hi = wilson_interval(45, 50)
    assert lo < 0.9 < hi
    s = summarize(np.array([0.5, 0.25, 1.0, 0.75]))  # fractional: normal interval
    assert s["ci95"][0] < s["accuracy"] == 0.625 < s["ci95"][1]
    assert summarize(np.array([1.0, 0.0, 1.0]))["ci95"] == list(wilson_interval(2, 3))


# ~60 s of compilation; fixed vs stochastic randomness is checked in CI by test_dwbox_fixed_aa.py
# and the robust smoke
@pytest.mark.slow
def test_fixed_randomness_is_deterministic_and_protocol_free():
    keys = example_keys(jr.key(4), jnp.arange(N))
    f = jax.jit(functools.partial(robust_scores, DEFENDED, attack,
                                  protocols=("one_shot", "worst_of@3"), randomness="fixed"))
    a, b = f(X, Y, keys), f(X, Y, keys)
    np.testing.assert_array_equal(a["x_adv"], b["x_adv"])
    assert a["pred_adv"].shape == (N, 1)  # one purification: the purifier is deterministic
    # the same fixed key in attack and scoring: re-predicting x_adv gives the same labels
    fixed = jax.vmap(lambda k: jr.fold_in(k, 4))(keys)
    np.testing.assert_array_equal(jnp.argmax(DEFENDED(a["x_adv"], fixed), -1),
                                  a["pred_adv"][:, 0])
    assert float(a["linf"].max()) <= 0.1 + 1e-6
    stoch = jax.jit(functools.partial(robust_scores, DEFENDED, attack,
                                      protocols=("worst_of@3",)))(X, Y, keys)
    assert stoch["pred_adv"].shape == (N, 3)


def _run(batch_size, mesh, store=None, log=None, **kw):
    kw.setdefault("protocols", ("one_shot", "worst_of@2"))
    kw.setdefault("self_check", 0)  # one more compilation; tested where asserted
    return evaluate_robustness(DEFENDED, attack, X, Y, np.arange(100, 100 + N),
                               key=jr.key(5), batch_size=batch_size, mesh=mesh, store=store,
                               progress=False, log=log, **kw)


# ~140 s (three compilations); the same contract runs in CI on the committed digits models in
# test_batch_invariance.py, the self-check in
# test_self_check_flags_a_record_that_differs_from_a_recomputation
@pytest.mark.slow
def test_record_is_independent_of_batch_size_and_devices():
    ref = _run(4, make_mesh(1))
    for batch_size, devices in [(16, 8)]:
        out = _run(batch_size, make_mesh(devices), self_check=4)
        for k in ("pred_clean", "pred_adv", "linf", "l2", "index", "adv@one_shot"):
            np.testing.assert_allclose(out["per_example"][k], ref["per_example"][k],
                                       atol=1e-5, err_msg=k)
    adv = ref["adv"]["one_shot"]
    assert adv["num_images"] == N and 0 <= adv["accuracy"] <= 1
    # the run-time self-check: first example of each device's share + the last one
    check = out["self_check"]
    assert check["checked"] == [100, 102, 104, 115] and check["mismatches"] == []
    assert check["agree"] == 4
    assert ref["clean"]["one_shot"]["accuracy"] >= adv["accuracy"] - 0.25


# ~60 s; resume after a kill is checked in CI by the robust and jacobian smokes and
# test_resume_with_another_batch_size_finishes_the_missing_examples
@pytest.mark.slow
def test_killed_run_resumes_without_recounting(tmp_path):
    mesh = make_mesh(1)
    full = _run(8, mesh)  # compiled once, reused by the killed and the resumed run
    fp = {"attack": "pgd", "eps": 0.1}

    def die(_line):
        raise KeyboardInterrupt  # the run dies after its first chunk was written

    with pytest.raises(KeyboardInterrupt):
        _run(8, mesh, store=ChunkStore(tmp_path, fingerprint=fp), log=die)
    assert ChunkStore(tmp_path).finished() == [(0, 8)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    resumed = _run(8, mesh, store=ChunkStore(tmp_path, fingerprint=fp))
    assert resumed["chunks_run"] == 1 and resumed["chunks_total"] == 2
    for k in ("pred_clean", "pred_adv", "linf", "index"):
        np.testing.assert_array_equal(resumed["per_example"][k], full["per_example"][k])
    assert resumed["adv"] == full["adv"]
    with pytest.raises(ValueError, match="another run"):
        ChunkStore(tmp_path, fingerprint={"attack": "apgd"})
    # compute seconds of every chunk are kept, so a resumed run reports the whole run's time
    assert np.all(resumed["per_example"]["seconds"] > 0)
    assert resumed["total_s"] > resumed["wall_s"] * 0.99


def test_resume_with_another_batch_size_finishes_the_missing_examples(tmp_path):
    mesh = make_mesh(1)
    full = _run(8, mesh)
    store = lambda: ChunkStore(tmp_path, fingerprint={"attack": "pgd"})

    def die(_line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(4, mesh, store=store(), log=die)  # one chunk of 4 finished
    resumed = _run(8, mesh, store=store())  # another batch size: no overlap, no recompute
    assert resumed["chunks_run"] == 2  # [4, 12) and [12, 16)
    assert ChunkStore(tmp_path).finished() == [(0, 4), (4, 12), (12, 16)]
    for k in ("pred_clean", "pred_adv", "index"):
        np.testing.assert_array_equal(resumed["per_example"][k], full["per_example"][k])


def test_labels_outside_the_classes_and_attacks_of_another_kind_are_refused():
    mesh = make_mesh(1)
    with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
        evaluate_robustness(DEFENDED, attack, X, Y.at[0].set(10), np.arange(N),
                            key=jr.key(0), mesh=mesh, progress=False)
    with pytest.raises(TypeError, match="AttackResult"):
        evaluate_robustness(DEFENDED, lambda m, x, y, k: x, X[:8], Y[:8], np.arange(8),
                            key=jr.key(0), mesh=mesh, batch_size=8, progress=False)


def test_bad_input_fails_before_work():
    mesh = make_mesh(8)
    with pytest.raises(ValueError, match="protocol"):
        _run(8, mesh, protocols=("best_of@3",))
    with pytest.raises(ValueError, match="randomness"):
        _run(8, mesh, randomness="frozen")
    with pytest.raises(ValueError, match="divide"):
        _run(12, mesh)
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        evaluate_robustness(DEFENDED, attack, X * 2, Y, np.arange(N), key=jr.key(0),
                            mesh=make_mesh(1), progress=False)


def test_score_predictions_uses_the_first_rows():
    preds = np.array([[0, 1], [0, 0], [2, 0]])  # (N=3, B=2)
    y = np.array([0, 0])
    np.testing.assert_array_equal(score_predictions(preds, y, "one_shot"), [1, 0])
    np.testing.assert_array_equal(score_predictions(preds, y, "worst_of@2"), [1, 0])
    np.testing.assert_array_equal(score_predictions(preds, y, "worst_of@3"), [0, 0])
    np.testing.assert_allclose(score_predictions(preds, y, "average@3"), [2 / 3, 2 / 3])
    np.testing.assert_array_equal(score_predictions(preds, y, "majority_vote@3"), [1, 1])
    with pytest.raises(ValueError, match="needs 4"):
        score_predictions(preds, y, "average@4")


def test_fixed_purifier_keys_are_the_fixed_modes_keys_and_check_indices():
    from jaxrob.evaluation import fixed_purifier_keys

    keys = fixed_purifier_keys(jr.key(5), jnp.array([3, 9]))
    want = jr.fold_in(jr.fold_in(jr.key(5), 9), 4)
    assert jr.key_data(keys[1]).tolist() == jr.key_data(want).tolist()
    with pytest.raises(ValueError, match="1-D integer array"):
        fixed_purifier_keys(jr.key(5), jnp.array([0.5]))


def test_run_chunks_places_arguments_and_allows_shard_map_inside():
    """Parameters committed to one device are replicated over the mesh; parameters already on
    the mesh's devices are left alone, so ``fn`` may index them inside its own shard_map."""
    from jax.sharding import PartitionSpec as P

    from jaxrob.evaluation import run_chunks

    mesh = make_mesh()
    table = jnp.arange(8.0)
    elsewhere = jax.device_put(jnp.float32(2.0), jax.devices()[-1])

    def fn(table, scale, batch, keys):
        def local(idx, x):
            return table[idx] * x  # a traced index into a closed-over parameter

        rows = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()),
                             out_specs=P("data"))(jnp.arange(8), scale)
        return {"y": batch["x"] * jnp.sum(rows)}

    data = {"x": np.arange(16, dtype=np.float32), "index": np.arange(16)}
    out = run_chunks(fn, data, key=jr.key(0), args=(table, elsewhere), batch_size=8,
                     mesh=mesh, progress=False)
    np.testing.assert_allclose(out.records["y"], data["x"] * 2.0 * 28.0)


def test_self_check_flags_a_record_that_differs_from_a_recomputation():
    from jaxrob.evaluation._robust import _recompute, _self_check

    idx = np.arange(100, 100 + N)
    # what a correct chunk program records: sample 0's clean prediction of each example
    recorded = np.array(_recompute(DEFENDED, "stochastic", X, Y, example_keys(jr.key(5), idx)))
    ok = _self_check(DEFENDED, np.asarray(X), np.asarray(Y), idx, recorded, key=jr.key(5),
                     randomness="stochastic", num=3, stride=4)
    assert ok["checked"] == [100, 104, 115] and not ok["mismatches"] and ok["agree"] == 3
    recorded[4] = (recorded[4] + 1) % 10  # what a miscompiled chunk program would leave
    with_bad = _self_check(DEFENDED, np.asarray(X), np.asarray(Y), idx, recorded,
                           key=jr.key(5), randomness="stochastic", num=3, stride=4)
    assert with_bad["mismatches"] == [104] and with_bad["agree"] == 2
    off = _self_check(DEFENDED, np.asarray(X), np.asarray(Y), idx, recorded, key=jr.key(5),
                      randomness="stochastic", num=0, stride=4)
    assert off == {"checked": [], "agree": 0, "mismatches": []}


def _noisy_defended(x, keys):
    """A randomised defence that costs nothing to compile: per-example input noise."""
    noise = jax.vmap(lambda k: jr.normal(k, x.shape[1:]))(keys)
    return logits_fn(x + 0.2 * noise)


def test_eot_samples_shard_over_devices_inside_robust_evaluation():
    """Batch 2 on 8 devices: a (data 2, eot 4) mesh splits each example's 8 EoT samples over 4
    devices; the record is the single-device one (per-example keys, sign steps)."""
    def run(mesh):
        atk = functools.partial(pgd, eps=0.1, num_steps=2, loss="ce", eot_samples=8,
                                eot_mesh=mesh)
        return evaluate_robustness(_noisy_defended, atk, X[:2], Y[:2], np.array([7, 11]),
                                   key=jr.key(5), batch_size=2, mesh=mesh, progress=False,
                                   self_check=0, keep_x_adv=True)["per_example"]

    ref = run(make_mesh(1))
    mesh = make_mesh(8, eot=4)
    assert dict(mesh.shape) == {"data": 2, "eot": 4}
    out = run(mesh)
    for k in ("pred_clean", "pred_adv", "linf", "l2", "x_adv", "index"):
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
    assert np.all(ref["linf"] > 0.05)  # the attack moved: the gradients were compared
    with pytest.raises(ValueError, match="eot: expected a positive divisor"):
        make_mesh(8, eot=3)
