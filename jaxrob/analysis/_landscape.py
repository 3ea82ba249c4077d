"""Loss landscapes around an input and attack trajectories, under given purifier keys.

Liu et al. (ICLR 2025, "Towards Understanding the Robustness of Diffusion-Based Purification: A
Stochastic Perspective") compare a randomised purifier in two settings: *stochastic* (fresh
purifier noise at every call; the attacker averages its gradient over EoT samples) and
*DW-box* (deterministic white box: the purifier's noise is fixed and known, so the defence is a
deterministic function). They plot the attack loss around clean inputs along the attack's
direction and a random one, and the loss along the attack's iterates, in both settings.

Both views here take the attack loss as ``loss_fn(x, y, key) -> (B,)`` (e.g.
``jaxrob.attacks.loss_from_logits(defended, "ce")``) and a set of purifier keys whose losses
are averaged: one fixed key per example is the DW-box view; ``K`` keys the EoT estimate of the
expected loss. A key set is ``(K,)`` single keys (each call gets one key) or ``(K, B)`` per-example
keys (call ``k`` gets the row ``keys[k]``, one key per example: the convention of
:class:`jaxrob.purify.DefendedModel`, so results do not depend on the batch).

* :func:`landscape_directions`: the two directions of the paper's plots, the adversarial one
  ``x_adv - x`` (or its sign) and a random Rademacher / Gaussian one orthogonal to it.
* :func:`loss_landscape`: the (EoT-averaged) loss on a 2-D grid ``x + a d1 + b d2``.
* :func:`attack_trajectory`: the (EoT-averaged) loss at every attack iterate.

Every (grid point or iterate, key) evaluation is one call of ``loss_fn`` on the whole batch;
``batch_size`` of them are ``vmap``-ed together by ``jax.lax.map``, which bounds memory and does
not change the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Float
from jaxtyping import Key as _KeyArray

from jaxrob._checks import check_images, check_positive_int
from jaxrob._jit import filter_jit
from jaxrob._types import AnyKey, Array, Images, Labels
from jaxrob.attacks._common import expand, per_example_norm

NORMS = ("linf", "l2")
DIRECTION_KINDS = ("rademacher", "gaussian")
_TINY = 1e-12

KeySet = _KeyArray[Array, " k"] | _KeyArray[Array, "k b"]
"""EoT keys: (K,) single keys, or (K, B) rows of per-example keys."""
IterateKeys = _KeyArray[Array, "t k"] | _KeyArray[Array, "t k b"]
"""Per-iterate EoT keys: (T, K) or (T, K, B)."""
Directions = Float[Array, "2 b h w c"]
Landscape = Float[Array, "na nb b"]  # (A, G, B) losses on the grid
Iterates = Float[Array, "t b h w c"]
Trajectory = Float[Array, "t b"]  # (T, B) losses at the iterates


# --------------------------------------------------------------------------------------------
# Checks (shapes only: they run before any work, on concrete or traced inputs alike).


def _check_norm(norm, allow_none: bool) -> None:
    if norm is None and allow_none:
        return
    if norm not in NORMS:
        extra = " or None (directions as given)" if allow_none else ""
        raise ValueError(f"norm: expected one of {list(NORMS)}{extra}, got {norm!r}")


def _check_labels(y, n: int) -> None:
    shape, dtype = getattr(y, "shape", None), getattr(y, "dtype", None)
    if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"y: expected an int array of labels, shape ({n},), got "
                         f"{type(y).__name__} {dtype}")
    if tuple(shape) != (n,):
        raise ValueError(f"y: expected shape ({n},) (one label per image), got {tuple(shape)}")


def _is_key_array(keys) -> bool:
    dtype = getattr(keys, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _check_keys(keys, lead: tuple[int, ...], n: int, name: str, what: str) -> int:
    """Check a key set shaped ``lead + (K,)`` or ``lead + (K, n)``; return K."""
    if not _is_key_array(keys):
        raise ValueError(f"{name}: expected typed PRNG keys (jax.random.key), shape "
                         f"{what}, got {type(keys).__name__} {getattr(keys, 'dtype', None)}")
    shape = tuple(keys.shape)
    r = len(lead)
    ok = (len(shape) in (r + 1, r + 2) and shape[:r] == lead
          and (len(shape) == r + 1 or shape[r + 1] == n))
    if not ok:
        raise ValueError(f"{name}: expected shape {what} with B = {n} images, got {shape}")
    if shape[r] < 1:
        raise ValueError(f"{name}: expected at least one key (K >= 1), got shape {shape}")
    return shape[r]


def _check_grid(values, name: str) -> Array:
    a = jnp.asarray(values, jnp.float32)
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array of grid coordinates, got "
                         f"shape {a.shape}")
    if not isinstance(a, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(a))):
        raise ValueError(f"{name}: expected finite grid coordinates")
    return a


def _check_batch_size(batch_size) -> int | None:
    return None if batch_size is None else check_positive_int(batch_size, "batch_size")


def _check_scale(scale) -> Array:
    if isinstance(scale, jax.core.Tracer):
        return scale.astype(jnp.float32)
    s = np.asarray(scale, np.float64)
    if s.ndim != 0 or not np.isfinite(s) or s <= 0:
        raise ValueError(f"scale: expected a positive number (the length of a unit step, e.g. "
                         f"the attack's eps), got {scale!r}")
    return jnp.asarray(scale, jnp.float32)


# --------------------------------------------------------------------------------------------
# Directions.


def unit_directions(d: Array, norm: str | None) -> Array:
    """Each example of ``d`` (B, ...) scaled to unit ``norm`` (zero stays zero); None: as is."""
    if norm is None:
        return d
    n_B = per_example_norm(d, norm)
    return d / expand(jnp.where(n_B > _TINY, n_B, 1.0))


@filter_jit
def _directions(x, x_adv, keys_B, *, kind, sign, norm):
    adv = x_adv - x
    adv = jnp.sign(adv) if sign else adv
    shape = x.shape[1:]
    draw = ((lambda k: jr.rademacher(k, shape, jnp.float32)) if kind == "rademacher"
            else (lambda k: jr.normal(k, shape, jnp.float32)))
    rnd = jax.vmap(draw)(keys_B)
    # Gram-Schmidt in the Euclidean inner product of the flattened images (a zero adversarial
    # direction leaves the random one as drawn)
    dot_B = jnp.sum((adv * rnd).reshape(x.shape[0], -1), axis=1)
    sq_B = jnp.sum((adv * adv).reshape(x.shape[0], -1), axis=1)
    rnd = rnd - expand(jnp.where(sq_B > _TINY, dot_B / jnp.where(sq_B > _TINY, sq_B, 1.0),
                                 0.0)) * adv
    return jnp.stack([unit_directions(adv, norm), unit_directions(rnd, norm)])


def landscape_directions(x: Images, x_adv: Images, key: AnyKey, *, kind: str = "rademacher",
                         sign: bool = False, norm: str | None = "linf") -> Directions:
    """The two directions of the paper's landscape plots, per example.

    ``d1 = x_adv - x`` (``sign=True``: ``sign(x_adv - x)``), the attack's direction, and ``d2``
    a random Rademacher (``kind="rademacher"``, entries +-1) or Gaussian direction with its
    component along ``d1`` removed (Gram-Schmidt in the flattened Euclidean inner product), so
    ``<d1_b, d2_b> = 0`` for every example ``b``. Both are then scaled to unit ``norm`` per
    example, which keeps them orthogonal. With ``norm="linf"`` and an Linf attack that reached
    its radius, ``x + eps * d1`` is ``x_adv`` itself. A zero ``d1`` (the attack did not move)
    stays zero, and ``d2`` is then the random draw, normalised.

    Args:
      x: (B, H, W, C) clean images in [0, 1].
      x_adv: (B, H, W, C) the attack's result for them.
      key: one key (example ``b`` draws from ``fold_in(key, b)``: depends on its position) or
        (B,) per-example keys (example ``b`` draws from ``key[b]``: batch-independent).
      kind: ``"rademacher"`` or ``"gaussian"``.
      sign: use the sign of ``x_adv - x`` (the direction of a sign-gradient step).
      norm: ``"linf"`` (default), ``"l2"``, or None (unnormalised).

    Returns:
      (2, B, H, W, C): ``[d1, d2]``, the ``directions`` of :func:`loss_landscape`.

    Raises:
      ValueError: bad images, shapes that differ, a key batch of another length, unknown
        ``kind`` or ``norm``.
    """
    check_images(x, "x")
    check_images(x_adv, "x_adv")
    if tuple(x_adv.shape) != tuple(x.shape):
        raise ValueError(f"x_adv: expected the shape of x {tuple(x.shape)}, got "
                         f"{tuple(x_adv.shape)}")
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"kind: expected one of {list(DIRECTION_KINDS)}, got {kind!r}")
    _check_norm(norm, allow_none=True)
    b = x.shape[0]
    if not _is_key_array(key) or jnp.ndim(key) not in (0, 1):
        raise ValueError(f"key: expected one typed PRNG key or ({b},) per-example keys, got "
                         f"{type(key).__name__} of shape {getattr(key, 'shape', None)}")
    if jnp.ndim(key) == 1 and key.shape[0] != b:
        raise ValueError(f"key: expected ({b},) per-example keys (one per image), got shape "
                         f"{tuple(key.shape)}")
    keys_B = key if jnp.ndim(key) == 1 else jax.vmap(lambda i: jr.fold_in(key, i))(
        jnp.arange(b, dtype=jnp.uint32))
    return _directions(x, x_adv, keys_B, kind=kind, sign=bool(sign), norm=norm)


# --------------------------------------------------------------------------------------------
# Landscape and trajectory.


def _per_example(loss_B, b: int):
    """``loss_fn``'s value, checked (at trace time) to be one loss per example."""
    if getattr(loss_B, "shape", None) != (b,):
        raise ValueError(f"loss_fn: expected a per-example loss of shape ({b},), got "
                         f"{getattr(loss_B, 'shape', type(loss_B).__name__)} (for a model "
                         f"logits_fn(x, key), use jaxrob.attacks.loss_from_logits(model, 'ce'))")
    return loss_B


def _map_padded(fn, idx, batch_size):
    """``lax.map(fn, idx, batch_size=...)`` over ``idx`` padded (with its last entry) to a
    multiple of ``batch_size``: one traced body instead of lax.map's batched one plus a
    remainder one, i.e. half the code to compile, for at most ``batch_size - 1`` wasted
    evaluations."""
    n = idx.shape[0]
    bs = min(batch_size or n, n)
    pad = -n % bs
    if pad:
        idx = jnp.concatenate([idx, jnp.broadcast_to(idx[-1:], (pad,))])
    return jax.lax.map(fn, idx, batch_size=bs)[:n]


def _eot_losses(loss_fn, inputs_fn, num_points: int, keys, y, batch_size):
    """(num_points, K, B) losses ``loss_fn(inputs_fn(p), y, keys[k])`` over every (p, k)."""
    k = keys.shape[0]
    idx = jnp.arange(num_points * k)  # evaluation i: point i // K, key i % K

    def one(i):
        return _per_example(loss_fn(inputs_fn(i // k), y, keys[i % k]), y.shape[0])

    return _map_padded(one, idx, batch_size).reshape(num_points, k, y.shape[0])


@filter_jit
def _landscape(loss_fn, x, y, d1, d2, alphas, betas, keys, scale, *, clip, batch_size):
    a_P = jnp.repeat(alphas, betas.shape[0])
    b_P = jnp.tile(betas, alphas.shape[0])

    def point(p):
        xp = x + scale * (a_P[p] * d1 + b_P[p] * d2)
        return jnp.clip(xp, 0.0, 1.0) if clip else xp

    losses = _eot_losses(loss_fn, point, a_P.shape[0], keys, y, batch_size)
    return jnp.mean(losses, axis=1).reshape(alphas.shape[0], betas.shape[0], x.shape[0])


def loss_landscape(loss_fn, x: Images, y: Labels, directions: Directions, alphas, betas,
                   keys: KeySet, *, norm: str | None = "linf", scale: float | Array = 1.0,
                   clip: bool = True, batch_size: int | None = None
                   ) -> Landscape:
    r"""The per-example attack loss on a 2-D grid around ``x``, averaged over EoT keys.

    .. math::
        L[i, j, b] = \frac{1}{K}\sum_{k<K} \ell\big(\mathrm{clip}_{[0,1]}(x_b + s\,(\alpha_i
        \hat d_{1,b} + \beta_j \hat d_{2,b})),\ y_b,\ \kappa_k\big)_b

    with ``\hat d`` the directions scaled to unit ``norm`` per example and ``s = scale``: with
    ``scale=eps`` the grid coordinates are in units of the attack's radius (``alphas =
    linspace(-2, 2, 21)`` spans twice the eps-ball). The same keys are used at every grid point
    (common random numbers): with one fixed key per example this is the deterministic (DW-box)
    defence's landscape; with ``K`` keys it is the ``K``-sample estimate of the expected loss,
    i.e. the mean of the ``K`` fixed-key landscapes. ``L[i, j]`` at ``alphas[i] = betas[j] = 0``
    is the loss at ``x``.

    Jitted (over the array leaves of ``loss_fn``, e.g. a model's parameters, and of the grid:
    another grid of the same size or new parameters do not recompile); the evaluations are
    ``jax.lax.map``-ed in groups of ``batch_size``.

    Args:
      loss_fn: ``loss_fn(x, y, key) -> (B,)`` (e.g. ``jaxrob.attacks.loss_from_logits(defended,
        "ce")``); examples must not interact.
      x: (B, H, W, C) images in [0, 1], the centre of the grid.
      y: (B,) int labels.
      directions: (2, B, H, W, C), ``[d1, d2]`` (:func:`landscape_directions`).
      alphas: (A,) coordinates along ``d1``; betas: (G,) coordinates along ``d2``.
      keys: (K,) keys (call ``k`` gets ``keys[k]``) or (K, B) per-example keys (call ``k``
        gets the row ``keys[k]``); the loss is averaged over the K calls.
      norm: the directions are scaled to unit ``"linf"`` (default) or ``"l2"`` norm per
        example (a zero direction stays zero); None uses them as given.
      scale: the length of a unit grid step (> 0).
      clip: clip every grid point to [0, 1] (the valid image box).
      batch_size: (grid point, key) evaluations ``vmap``-ed together, each on the whole batch
        (memory: ``batch_size * B`` images through ``loss_fn``); None: all ``A * G * K`` at
        once.

    Returns:
      (A, G, B) mean losses.

    Raises:
      ValueError: bad images or labels, ``directions`` not shaped (2, B, H, W, C), empty or
        non-finite grids, keys not shaped (K,) / (K, B), unknown ``norm``, ``scale <= 0``,
        ``batch_size`` not a positive integer, or a ``loss_fn`` that does not return (B,).

    References:
      Liu et al., "Towards Understanding the Robustness of Diffusion-Based Purification: A
      Stochastic Perspective", ICLR 2025 (loss landscapes, stochastic vs DW-box); Li et al.,
      "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018 (2-D slices).
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(x, y, key) -> (B,), got "
                        f"{type(loss_fn).__name__}")
    check_images(x, "x")
    b = x.shape[0]
    _check_labels(y, b)
    shape = tuple(getattr(directions, "shape", ()))
    if shape != (2, *x.shape):
        raise ValueError(f"directions: expected shape (2, B, H, W, C) = {(2, *x.shape)} (two "
                         f"directions per image of x), got {shape}")
    alphas = _check_grid(alphas, "alphas")
    betas = _check_grid(betas, "betas")
    _check_keys(keys, (), b, "keys", "(K,) or (K, B)")
    _check_norm(norm, allow_none=True)
    scale = _check_scale(scale)
    batch_size = _check_batch_size(batch_size)
    d = jnp.asarray(directions, jnp.float32)
    d1, d2 = unit_directions(d[0], norm), unit_directions(d[1], norm)
    return _landscape(loss_fn, x, jnp.asarray(y, jnp.int32), d1, d2, alphas, betas, keys,
                      scale, clip=bool(clip), batch_size=batch_size)


@filter_jit
def _trajectory(loss_fn, iterates, y, keys, *, per_iterate, batch_size):
    t = iterates.shape[0]
    if not per_iterate:
        losses = _eot_losses(loss_fn, lambda i: iterates[i], t, keys, y, batch_size)
        return jnp.mean(losses, axis=1)
    k = keys.shape[1]
    flat = keys.reshape(t * k, *keys.shape[2:])  # row t * K + k: iterate t, key k

    def one(i):
        return _per_example(loss_fn(iterates[i // k], y, flat[i]), y.shape[0])

    out = _map_padded(one, jnp.arange(t * k), batch_size)
    return jnp.mean(out.reshape(t, k, y.shape[0]), axis=1)


def attack_trajectory(loss_fn, iterates: Iterates, y: Labels, keys: KeySet | IterateKeys, *,
                      per_iterate: bool = False, batch_size: int | None = None) -> Trajectory:
    """The per-example attack loss at every iterate of an attack, averaged over EoT keys.

    ``out[t, b] = mean_k loss_fn(iterates[t], y, keys_t[k])[b]`` with ``keys_t = keys``
    (``per_iterate=False``: the same keys at every iterate -- one fixed key per example is the
    DW-box view of an attack on a deterministic defence) or ``keys_t = keys[t]``
    (``per_iterate=True``: fresh keys at every iterate -- the stochastic view, what a defender
    drawing new noise at each query would score).

    Args:
      loss_fn: ``loss_fn(x, y, key) -> (B,)``.
      iterates: (T, B, H, W, C), e.g. ``pgd(..., return_iterates=True).iterates`` (``x_0``
        first).
      y: (B,) int labels.
      keys: ``per_iterate=False``: (K,) or (K, B) (as :func:`loss_landscape`);
        ``per_iterate=True``: (T, K) or (T, K, B).
      per_iterate: whether ``keys`` has a leading iterate axis.
      batch_size: (iterate, key) evaluations ``vmap``-ed together; None: all ``T * K``.

    Returns:
      (T, B) mean losses.

    Raises:
      ValueError: iterates not (T, B, H, W, C) images in [0, 1], labels not (B,), keys of
        another shape, ``batch_size`` not a positive integer, or a ``loss_fn`` that does not
        return (B,).
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(x, y, key) -> (B,), got "
                        f"{type(loss_fn).__name__}")
    shape = tuple(getattr(iterates, "shape", ()))
    if len(shape) != 5 or shape[0] < 1:
        raise ValueError(f"iterates: expected shape (T, B, H, W, C) with T >= 1 (e.g. "
                         f"AttackResult.iterates), got {shape}")
    check_images(iterates.reshape(-1, *shape[2:]), "iterates")
    t, b = shape[:2]
    _check_labels(y, b)
    if per_iterate:
        _check_keys(keys, (t,), b, "keys", f"(T, K) or (T, K, B) with T = {t} iterates "
                    "(per_iterate=True)")
    else:
        _check_keys(keys, (), b, "keys", "(K,) or (K, B) (per_iterate=False; fresh keys per "
                    "iterate: per_iterate=True)")
    batch_size = _check_batch_size(batch_size)
    return _trajectory(loss_fn, jnp.asarray(iterates, jnp.float32), jnp.asarray(y, jnp.int32),
                       keys, per_iterate=bool(per_iterate), batch_size=batch_size)
