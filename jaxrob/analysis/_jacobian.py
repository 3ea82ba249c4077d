"""Jacobians of image-to-image maps (purifiers under fixed randomness) and their spectra.

A purifier with its key fixed, ``f(x) = purify(x, key)``, is a deterministic map
``R^D -> R^D`` (``D = H*W*C``). Its Jacobian at ``x`` tells how the eps-ball around ``x`` is
deformed: singular values below 1 compress, above 1 expand (Yuezhang & Wei 2025 find > 90% of
them below 0.25 for DiffPure on CIFAR-10).

* :func:`jacobian` materialises ``J`` (D_out, D_in): at once (``jacfwd``/``jacrev``) or in
  chunks of input directions (``jvp_chunks``: one linearisation, ``lax.map`` of JVPs) or output
  directions (``vjp_chunks``: one VJP closure, ``lax.map`` of VJPs), so memory beyond ``J`` is
  bounded by ``chunk`` directions; ``mesh=`` shards the directions over the ``data`` axis.
* :func:`top_singular_values` never forms ``J``: Lanczos on ``J^T J`` or randomized SVD, both
  from matrix-free JVP/VJP operators.

Forward mode (``jacfwd``, ``jvp_chunks``, ``ad="jvp"``) does not work through models built with
``fast_vjp=True`` (their convolution is a ``jax.custom_vjp``): build the ``fast_vjp=False`` twin,
or use ``jacrev``/``vjp_chunks``/``ad="vjp"``, which obtains ``J v`` as the transpose of the
VJP and so needs reverse mode only.

References:
  Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839.
  Halko, Martinsson, Tropp. Finding Structure with Randomness: Probabilistic Algorithms for
  Constructing Approximate Matrix Decompositions. SIAM Review 2011.
  Golub, Van Loan. Matrix Computations, 4th ed., Sec. 10.1 (Lanczos), 10.4 (Golub-Kahan).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxrob._checks import check_choice, check_positive_int
from jaxrob._types import Array, Key
from jaxrob.analysis._common import Static
from jaxrob.parallel import DATA_AXIS

METHODS = ("jacfwd", "jacrev", "jvp_chunks", "vjp_chunks")
SVD_METHODS = ("lanczos", "randomized")
AD_MODES = ("jvp", "vjp", "mixed")
ON_UNCONVERGED = ("warn", "raise", "ignore")
_HI = lax.Precision.HIGHEST


def _flat_fn(f, shape):
    return lambda v: jnp.reshape(f(jnp.reshape(v, shape)), (-1,))


def _check_x(x) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"x: expected a floating-point array (one image, e.g. (1, H, W, C)), "
                         f"got {getattr(x, 'dtype', type(x).__name__)}")
    if x.size == 0:
        raise ValueError("x: expected a non-empty array")


def _directions(make_fn, v, num, chunk, mesh):
    """Stack ``fn(i)`` for ``i < num``, ``fn = make_fn(v)`` maps a basis index to a row.

    ``make_fn`` linearises at ``v``; with a mesh it runs once per device inside
    ``jax.shard_map`` (``v`` cast to device-varying so its tangents may vary too).
    """
    if mesh is None:
        return lax.map(make_fn(v), jnp.arange(num), batch_size=chunk or num)
    n_dev = mesh.shape[DATA_AXIS]
    padded = -(-num // n_dev) * n_dev  # index >= num gives a zero direction, sliced off below

    def local(idx, v):
        fn = make_fn(lax.pcast(v, (DATA_AXIS,), to="varying"))
        return lax.map(fn, idx, batch_size=chunk or idx.shape[0])

    out = jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P()),
                        out_specs=P(DATA_AXIS))(jnp.arange(padded), v)
    return out[:num]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("method", "chunk", "mesh"))
def _jacobian(f, x, *, method, chunk, mesh):
    g = _flat_fn(f, x.shape)
    v = jnp.reshape(x, (-1,))
    if method == "jacfwd":
        return jax.jacfwd(g)(v)
    if method == "jacrev":
        return jax.jacrev(g)(v)
    if method == "jvp_chunks":
        def make_col(v):
            _, jvp = jax.linearize(g, v)
            return lambda i: jvp(jax.nn.one_hot(i, v.shape[0], dtype=v.dtype))

        return _directions(make_col, v, v.shape[0], chunk, mesh).T
    d_out = jax.eval_shape(g, v).shape[0]

    def make_row(v):
        y, vjp = jax.vjp(g, v)
        return lambda i: vjp(jax.nn.one_hot(i, d_out, dtype=y.dtype))[0]

    return _directions(make_row, v, d_out, chunk, mesh)


def _is_custom_vjp_jvp_error(e: TypeError) -> bool:
    """JAX's TypeError for forward-mode differentiation of a ``jax.custom_vjp`` function."""
    msg = str(e)
    return "custom_vjp" in msg and "forward-mode" in msg


def _forward_mode_error(what: str, fix: str) -> TypeError:
    return TypeError(
        f"{what} takes forward-mode derivatives (JVPs) of f, which cannot go through a "
        "jax.custom_vjp such as the convolutions and norms of models built with "
        f"fast_vjp=True. {fix} Or build f over the fast_vjp=False twin of the model "
        "(model.clone(fast_vjp=False), same params).")


def jacobian(f: Callable[[Array], Array], x: Array, *, method: str = "jacfwd",
             chunk: int | None = None, mesh: jax.sharding.Mesh | None = None) -> Array:
    r"""The dense Jacobian ``J_{ij} = \partial f(x)_i / \partial x_j`` of ``f`` at one input.

    ``f`` is applied to ``x``'s shape (e.g. one (1, H, W, C) image); input and output are
    flattened in C order, so ``J`` is (D_out, D_in) and ``J @ v.ravel() == jvp(f, x, v).ravel()``.

    Args:
      f: a differentiable function of one array (e.g. ``lambda x: purify(x, key)``, fixed key).
        Jitted as a static argument (by identity).
      x: the input, e.g. (1, H, W, C).
      method: ``"jacfwd"`` / ``"jacrev"`` (all directions in one ``vmap``), ``"jvp_chunks"``
        (columns: one ``jax.linearize``, then JVPs of ``chunk`` input basis vectors at a time)
        or ``"vjp_chunks"`` (rows: one ``jax.vjp``, then VJPs of ``chunk`` output basis vectors
        at a time). Forward modes need ``fast_vjp=False`` models: through a ``custom_vjp``
        (``fast_vjp=True``) they raise a ``TypeError`` naming the reverse-mode alternatives.
      chunk: directions per ``lax.map`` step for the chunked methods (need not divide D: the
        remainder runs as one extra batch); None: all at once.
      mesh: shard the directions of a chunked method over this mesh's ``data`` axis
        (``jax.shard_map``; each device runs its slice ``chunk`` at a time; D is padded to a
        multiple of the device count with zero directions). The result equals the unsharded one.

    Returns:
      (D_out, D_in) float Jacobian (sharded over one axis when ``mesh`` is given).
    """
    check_choice(method, METHODS, "method")
    _check_x(x)
    if method in ("jacfwd", "jacrev"):
        if chunk is not None or mesh is not None:
            raise ValueError(f"chunk/mesh: only used with method='jvp_chunks' or "
                             f"'vjp_chunks', got method={method!r}")
    if chunk is not None:
        chunk = check_positive_int(chunk, "chunk")
    if mesh is not None and DATA_AXIS not in mesh.shape:
        raise ValueError(f"mesh: expected a '{DATA_AXIS}' axis (jaxrob.parallel.make_mesh), "
                         f"got axes {tuple(mesh.shape)}")
    try:
        return _jacobian(Static(f), x, method=method, chunk=chunk, mesh=mesh)
    except TypeError as e:
        if method in ("jacfwd", "jvp_chunks") and _is_custom_vjp_jvp_error(e):
            raise _forward_mode_error(
                f"jacobian(method={method!r})",
                "Use method='vjp_chunks' or 'jacrev' (reverse mode only).") from e
        raise


def singular_values(jac: Array) -> Array:
    """All singular values of a dense (D_out, D_in) matrix, descending (``min(D_out, D_in)``).

    Args:
      jac: a 2-D matrix, e.g. from :func:`jacobian`.

    Returns:
      (min(D_out, D_in),) singular values, descending.
    """
    if getattr(jac, "ndim", None) != 2:
        raise ValueError(f"jac: expected a 2-D (D_out, D_in) matrix, got shape "
                         f"{getattr(jac, 'shape', type(jac).__name__)}")
    return jnp.linalg.svd(jac, compute_uv=False)


def _operators(g, v, ad, g_reverse=None):
    """``(d_out, J, J^T)`` as matrix-free linear maps on flat vectors."""
    if ad == "mixed":  # J from forward mode of g, J^T from reverse mode of its twin
        y, jvp = jax.linearize(g, v)
        _, vjp = jax.vjp(g_reverse, v)
        return y.shape[0], jvp, lambda u: vjp(u)[0]
    if ad == "jvp":
        y, jvp = jax.linearize(g, v)
        jt_tuple = jax.linear_transpose(jvp, v)
        return y.shape[0], jvp, lambda u: jt_tuple(u)[0]
    y, vjp = jax.vjp(g, v)
    jt = lambda u: vjp(u)[0]
    jvp_tuple = jax.linear_transpose(jt, y)
    return y.shape[0], lambda w: jvp_tuple(w)[0], jt


def _orth_twice(Q, w):
    """Remove the span of the rows of ``Q`` from ``w`` (classical Gram-Schmidt, twice)."""
    for _ in range(2):
        w = w - jnp.dot(Q.T, jnp.dot(Q, w, precision=_HI), precision=_HI)
    return w


def _lanczos(matvec, d, m, key):
    """``m`` Lanczos steps with full reorthogonalisation: (alphas, betas, Q (m, d))."""
    q0 = jr.normal(jr.fold_in(key, 0), (d,))
    Q = jnp.zeros((m + 1, d)).at[0].set(q0 / jnp.linalg.norm(q0))

    def body(j, carry):
        Q, alpha, beta, scale = carry
        q = Q[j]
        w = matvec(q)
        a = jnp.dot(q, w, precision=_HI)
        w = _orth_twice(Q, w)  # rows > j are still zero; removes a*q_j and b_{j-1}*q_{j-1} too
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(a), b))
        # Breakdown (an invariant subspace was found): continue from a fresh random direction
        # orthogonal to the Krylov basis; beta = 0 decouples the tridiagonal matrix.
        broke = b <= 1e-6 * scale
        r = _orth_twice(Q, jr.normal(jr.fold_in(key, j + 1), (d,)))
        q_next = jnp.where(broke, r / jnp.linalg.norm(r), w / jnp.where(broke, 1.0, b))
        return (Q.at[j + 1].set(q_next), alpha.at[j].set(a),
                beta.at[j].set(jnp.where(broke, 0.0, b)), scale)

    init = (Q, jnp.zeros((m,)), jnp.zeros((m,)), jnp.zeros(()))
    Q, alpha, beta, _ = lax.fori_loop(0, m, body, init)
    return alpha, beta, Q[:m]


def _batched(fn, rows, chunk):
    return lax.map(fn, rows, batch_size=chunk or rows.shape[0])


def _default_lanczos_iters(k: int, d: int) -> int:
    """Default Lanczos steps for the top ``k``: ``min(D, 2k + 30)``."""
    return min(d, 2 * k + 30)


def _error_bounds(r, s, floor):
    r"""Singular-value error bounds from residual norms ``r = ||J^T J v - s^2 v||`` (unit v).

    Some eigenvalue ``\lambda`` of ``J^T J`` has ``|s^2 - \lambda| <= r``, so some singular
    value ``\sigma = \sqrt{\lambda}`` (or 0) has ``|s - \sigma| <= \sqrt{r}``; and with
    ``u = J v / s`` the unit vector ``[u; v] / \sqrt{2}`` has residual ``r / (\sqrt{2} s)``
    as an eigenvector of ``[[0, J], [J^T, 0]]`` (eigenvalues ``\pm\sigma_i`` and 0), so some
    ``\sigma`` (or 0) has ``|s - \sigma| <= r / (\sqrt{2} s)``.
    """
    r = jnp.maximum(r, floor)
    return jnp.minimum(r / (jnp.sqrt(2.0) * jnp.where(s > 0, s, jnp.inf)), jnp.sqrt(r))


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("k", "method", "num_iters", "ad", "oversample",
                                    "return_vectors", "chunk", "f_reverse"))
def _top_singular(f, x, key, *, k, method, num_iters, ad, oversample, return_vectors, chunk,
                  f_reverse):
    """``(s, U, V, err)``: U and V None unless ``return_vectors``, ``err`` as documented."""
    g = _flat_fn(f, x.shape)
    v = jnp.reshape(x, (-1,)).astype(jnp.float32)
    d_in = v.shape[0]
    g_rev = None if f_reverse is None else _flat_fn(f_reverse, x.shape)
    d_out, jvp, jt = _operators(g, v, ad, g_rev)
    eps = jnp.finfo(jnp.float32).eps
    if method == "lanczos":
        alpha, beta, Q = _lanczos(lambda q: jt(jvp(q)), d_in, num_iters, key)
        T = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
        theta, S = jnp.linalg.eigh(T)
        top = jnp.argsort(-theta)[:k]
        s = jnp.sqrt(jnp.maximum(theta[top], 0.0))
        # Ritz residuals ||A V - V diag(theta)|| = |beta_m e_m^T y| (A Q^T = Q^T T + beta_m
        # q_{m+1} e_m^T holds to round-off under full reorthogonalisation), floored at that
        # round-off, sqrt(m) eps ||A||
        r = jnp.abs(beta[-1] * S[-1, top])
        err = _error_bounds(r, s, jnp.sqrt(num_iters) * eps * jnp.max(jnp.abs(theta)))
        if not return_vectors:
            return s, None, None, err
        V = jnp.dot(Q.T, S[:, top], precision=_HI)  # (d_in, k)
        U = _batched(jvp, V.T, chunk).T / jnp.where(s > 0, s, 1.0)[None, :]
        return s, U, V, err
    ell = min(k + oversample, d_in, d_out)
    omega = jr.normal(key, (ell, d_in))
    Qy = jnp.linalg.qr(_batched(jvp, omega, chunk).T)[0]  # (d_out, ell)

    def power(_, Qy):
        Qz = jnp.linalg.qr(_batched(jt, Qy.T, chunk).T)[0]  # (d_in, ell)
        return jnp.linalg.qr(_batched(jvp, Qz.T, chunk).T)[0]

    Qy = lax.fori_loop(0, num_iters, power, Qy)
    B = _batched(jt, Qy.T, chunk)  # (ell, d_in) = Q^T J
    Ub, s, Vt = jnp.linalg.svd(B, full_matrices=False)
    s, U, V = s[:k], jnp.dot(Qy, Ub[:, :k], precision=_HI), Vt[:k].T
    # J^T u_i = B^T Ub_i = s_i v_i by construction, so the residual of the singular triplet is
    # ||J v_i - s_i u_i|| = ||(I - Q Q^T) J v_i|| (k more JVPs); as an eigen-residual of
    # [[0, J], [J^T, 0]] at s_i with the unit vector [u_i; v_i] / sqrt(2), it bounds the
    # distance from s_i to the nearest singular value (or 0) by ||J v_i - s_i u_i|| / sqrt(2)
    JV = _batched(jvp, V.T, chunk)  # (k, d_out)
    r = jnp.linalg.norm(JV - s[:, None] * U.T, axis=1) / jnp.sqrt(2.0)
    err = jnp.maximum(r, jnp.sqrt(ell) * eps * s[0])
    if not return_vectors:
        return s, None, None, err
    return s, U, V, err


def _report_unconverged(s, err, *, tol, on_unconverged, hint, stacklevel):
    s, err = np.asarray(s), np.asarray(err)
    bound = tol * s[..., :1]
    bad = ~(err <= bound)  # NaN counts as not converged
    if not bad.any():
        return
    with np.printoptions(precision=4):
        msg = (f"top_singular_values: {int(bad.sum())} of the {bad.size} requested singular "
               f"values have not converged (error bound > tol * s_max = "
               f"{np.ravel(bound)[0]:.3g}): s = {s}, error bounds = {err}. {hint}")
    if on_unconverged == "raise":
        raise RuntimeError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


def _check_converged(s, err, *, tol, on_unconverged, hint):
    if on_unconverged == "ignore":
        return
    report = functools.partial(_report_unconverged, tol=tol, on_unconverged=on_unconverged,
                               hint=hint, stacklevel=4)
    if isinstance(s, jax.core.Tracer) or isinstance(err, jax.core.Tracer):
        jax.debug.callback(report, s, err)  # inside the caller's jit: checked when it runs
    else:
        report(s, err)


def top_singular_values(f: Callable[[Array], Array], x: Array, *, k: int, key: Key,
                        method: str = "lanczos", num_iters: int | None = None,
                        ad: str = "jvp", oversample: int = 10, chunk: int | None = None,
                        return_vectors: bool = False,
                        f_reverse: Callable[[Array], Array] | None = None,
                        return_residuals: bool = False, tol: float = 1e-3,
                        on_unconverged: str = "warn"):
    r"""The ``k`` largest singular values of ``J = \partial f / \partial x`` without forming J.

    ``"lanczos"``: ``num_iters = m`` Lanczos steps on ``A = J^T J`` (``A q = J^T (J q)``, one
    JVP and one VJP per step) with full reorthogonalisation (classical Gram-Schmidt, twice) in
    a ``lax.fori_loop``; the Ritz values ``\theta`` of the tridiagonal ``T_m = Q^T A Q`` give
    ``\sigma = \sqrt{\theta}``. Top Ritz values converge first, fastest with a spectral gap;
    close singular values (a relative gap of 1e-3..1e-2 below the top few) need many more steps
    than ``k``: with too few, a Ritz value sits between or below a pair and the ``k``-th value
    returned is a lower one (a value looks "skipped"). Working with ``J^T J`` squares the
    condition number: in float32, singular values below about ``1e-3 * sigma_max`` are
    inaccurate (use the randomized method or :func:`jacobian` there).

    ``"randomized"``: Halko et al.'s randomized range finder with ``q = num_iters`` power
    iterations: ``Y = J \Omega`` (``\ell = k + oversample`` Gaussian probes, batched JVPs),
    ``Q = qr((J J^T)^q Y)`` (re-orthonormalised after every product), then the SVD of the small
    ``B = Q^T J`` (batched VJPs). The error decays like ``(\sigma_{\ell+1}/\sigma_k)^{2q+1}``.

    Convergence check: every value comes with an error bound ``e_i``: some singular value of
    ``J`` (or 0) lies within ``e_i`` of ``s_i``. Lanczos: from the Ritz residual
    ``r_i = ||A v_i - s_i^2 v_i|| = |\beta_m e_m^T y_i|`` (``y_i`` the eigenvector of ``T_m``;
    no extra products), ``e_i = min(r_i / (\sqrt{2} s_i), \sqrt{r_i})``. Randomized: from the
    singular-triplet residual (``J^T u_i = s_i v_i`` holds by construction),
    ``e_i = ||J v_i - s_i u_i|| / \sqrt{2}`` (``k`` more JVPs). Both are floored at float32
    round-off. When some ``e_i > tol * s_1``, ``on_unconverged`` decides. The values
    themselves are usually far more accurate than ``e_i`` (the error is about ``e_i^2 / gap``).
    A small ``e_i`` says that ``s_i`` *is* a singular value, not that it is the ``i``-th: one
    whose singular vector is nearly orthogonal to the Krylov space can still be missed (rare
    once all ``k`` bounds are small; hence the margin of the default ``num_iters``).

    Args:
      f: a differentiable function of one array (static argument, by identity).
      x: the input, e.g. one (1, H, W, C) image.
      k: how many singular values; at most ``min(D_in, D_out)``.
      key: PRNG key for the start vector / probes.
      method: ``"lanczos"`` or ``"randomized"``.
      num_iters: Lanczos steps (``k <= m <= D_in``; default ``min(D_in, 2k + 30)``)
        or power iterations (default 4).
      ad: ``"jvp"`` (``jax.linearize`` + ``jax.linear_transpose``), ``"vjp"`` (``jax.vjp`` and
        its transpose: reverse mode only, for ``fast_vjp=True`` models) or ``"mixed"``
        (``J v`` from ``jax.linearize`` of ``f``, ``J^T u`` from ``jax.vjp`` of
        ``f_reverse``: no transposed product, the fastest on CPU, where a transposed product
        runs the slow convolution-gradient path inside loops -- about 4x faster Lanczos on
        the MNIST purifier, ``benchmarks/README.md``). ``"jvp"`` and ``"mixed"`` take forward
        mode of ``f`` and raise a ``TypeError`` through a ``custom_vjp`` (``fast_vjp=True``).
      oversample: extra probes of the randomized method.
      chunk: probes per ``lax.map`` step in the randomized method (and for Lanczos' left
        vectors); None: all at once.
      return_vectors: also return the singular vectors.
      f_reverse: with ``ad="mixed"`` (required there, refused otherwise): the same function
        as ``f`` built for reverse mode, e.g. ``f`` over ``fast_vjp=True`` models while ``f``
        uses the ``fast_vjp=False`` twins (static argument, by identity).
      return_residuals: also return the (k,) error bounds ``e`` (last in the result).
      tol: a value has converged when its error bound is at most ``tol * s_1`` (relative to
        the largest value returned).
      on_unconverged: ``"warn"`` (``RuntimeWarning``), ``"raise"`` (``RuntimeError``) or
        ``"ignore"`` when some value has not converged. Inside ``jax.jit`` the check runs as a
        ``jax.debug.callback`` when the computation runs (a raise then surfaces as JAX's
        runtime error carrying the message).

    Returns:
      (k,) singular values, descending; with ``return_vectors``, ``(s, U, V)`` where U is
      (D_out, k), V is (D_in, k) and ``J V ~= U diag(s)``; with ``return_residuals`` the
      error bounds ``e`` (k,) are appended: ``(s, e)`` or ``(s, U, V, e)``.

    References:
      Halko, Martinsson, Tropp. SIAM Review 53(2), 2011, Algorithms 4.3/4.4 and 5.1.
      Golub, Van Loan. Matrix Computations, Sec. 10.1; Parlett, The Symmetric Eigenvalue
      Problem, Sec. 13.2 (Ritz residual bounds).
    """
    check_choice(method, SVD_METHODS, "method")
    check_choice(ad, AD_MODES, "ad")
    check_choice(on_unconverged, ON_UNCONVERGED, "on_unconverged")
    if (ad == "mixed") != (f_reverse is not None):
        raise ValueError("f_reverse: expected the reverse-mode twin of f exactly when "
                         f"ad='mixed', got ad={ad!r} and f_reverse={f_reverse!r}")
    if f_reverse is not None and not callable(f_reverse):
        raise TypeError(f"f_reverse: expected a callable, got {type(f_reverse).__name__}")
    _check_x(x)
    k = check_positive_int(k, "k")
    d_in = int(x.size)
    d_out = int(jax.eval_shape(f, x).size)
    if k > min(d_in, d_out):
        raise ValueError(f"k: expected at most min(D_in, D_out) = {min(d_in, d_out)} "
                         f"(D_in={d_in}, D_out={d_out}), got {k}")
    if method == "lanczos":
        m = _default_lanczos_iters(k, d_in) if num_iters is None else check_positive_int(
            num_iters, "num_iters")
        if not k <= m <= d_in:
            raise ValueError(f"num_iters: Lanczos needs k <= num_iters <= D_in, i.e. "
                             f"{k}..{d_in} for k={k}, got {m} (default: "
                             f"{_default_lanczos_iters(k, d_in)})")
        hint = (f"Raise num_iters (now {m}; at most D_in = {d_in}) or pass "
                "on_unconverged='ignore'.")
    else:
        m = 4 if num_iters is None else int(num_iters)
        if isinstance(num_iters, bool) or m < 0:
            raise ValueError(f"num_iters: expected >= 0 power iterations, got {num_iters!r}")
        hint = (f"Raise num_iters (power iterations, now {m}) or oversample (now "
                f"{int(oversample)}), or pass on_unconverged='ignore'.")
    oversample = int(oversample)
    if oversample < 0:
        raise ValueError(f"oversample: expected >= 0, got {oversample}")
    if chunk is not None:
        chunk = check_positive_int(chunk, "chunk")
    tol = float(tol)
    if not tol > 0:
        raise ValueError(f"tol: expected > 0, got {tol}")
    try:
        s, U, V, err = _top_singular(
            Static(f), x, key, k=k, method=method, num_iters=m, ad=ad, oversample=oversample,
            return_vectors=bool(return_vectors), chunk=chunk,
            f_reverse=None if f_reverse is None else Static(f_reverse))
    except TypeError as e:
        if ad != "vjp" and _is_custom_vjp_jvp_error(e):
            fix = ("ad='mixed' takes J v by forward mode of f (f_reverse is used in reverse "
                   "mode only)." if ad == "mixed" else "Use ad='vjp' (reverse mode only).")
            raise _forward_mode_error(f"top_singular_values(ad={ad!r})", fix) from e
        raise
    _check_converged(s, err, tol=tol, on_unconverged=on_unconverged, hint=hint)
    out = (s, U, V) if return_vectors else (s,)
    if return_residuals:
        out += (err,)
    return out if len(out) > 1 else out[0]
