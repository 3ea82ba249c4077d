"""GroupNorm and upsampling layers with hand-written VJPs (``fast_vjp=True`` models).

Why: a dense Jacobian, a Lanczos spectrum or a batched attack pulls many cotangents back
through a UNet. Profiling the 784-row Jacobian of the 10-step MNIST purifier on XLA:CPU
(``benchmarks/README.md``, "Where the reverse pass spends its time") put 29% of the time in the
autodiff of GroupNorm (the transpose of its mean / centred-variance graph: several batched
reductions over strided axes per layer) and 12% in the transpose of the nearest-neighbour
upsample (a reduce over 2x2 windows that XLA:CPU's YNN fusion runs at a few GB/s).

* :func:`group_norm` computes the forward exactly as ``flax.linen.GroupNorm``
  (``use_fast_variance=False``: same operations in the same order, so the same values) and
  pulls back with the closed form ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``,
  ``g = ct * scale``, per group. At one primal image (batch 1: Jacobians, spectra) both group
  means are one product of the cotangent with a fixed (H*W*C, 2G) matrix, which ``vmap`` over
  cotangents turns into a single skinny matrix product.
* :func:`upsample_nearest2x` repeats every pixel 2x2; its VJP adds the four strided phases of
  the cotangent. :func:`upsample_conv3` (upsample, then the 3x3 convolution of the UNet)
  pulls back with one stride-2 4x4 convolution instead of a full-resolution 3x3 convolution
  plus a window sum.

All are ``jax.custom_vjp`` functions, so forward-mode (``jax.jvp``, ``jacfwd``) through them
raises, like the fast convolution of :mod:`jaxrob.models._conv`: models use them only when
built with ``fast_vjp=True`` (same parameters and forward values as the plain layers). Values
and gradients equal the plain versions' to float rounding (``tests/models/test_fast_vjp_ops.py``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["GroupNorm", "UpsampleConv", "group_norm", "upsample_conv3", "upsample_nearest2x",
           "upsample_nearest2x_plain"]


def _stats(xg):
    """Mean and centred variance over the (H, W, C/G) axes of a (B, H, W, G, C/G) array."""
    mean = xg.mean((1, 2, 4), keepdims=True)
    var = jnp.square(xg - mean).mean((1, 2, 4), keepdims=True)
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, num_groups: int, eps: float):
    """GroupNorm of an NHWC array over ``num_groups`` channel groups, with scale and bias (C,).

    Forward identical to ``flax.linen.GroupNorm(num_groups, epsilon=eps,
    use_fast_variance=False)``; reverse mode by the closed form in the module docstring.
    """
    return _group_norm_fwd(x, scale, bias, num_groups, eps)[0]


def _group_norm_fwd(x, scale, bias, num_groups, eps):
    B, H, W, C = x.shape
    xg = x.reshape(B, H, W, num_groups, C // num_groups)
    mean, var = _stats(xg)
    rstd = lax.rsqrt(var + eps)
    gshape = (1, 1, 1, num_groups, C // num_groups)
    y = (xg - mean) * (rstd * scale.reshape(gshape)) + bias.reshape(gshape)
    return y.reshape(B, H, W, C).astype(x.dtype), (x, mean, rstd, scale)


def _group_sum(t_BC, num_groups):
    """(B, C) per-channel values -> per-group sums broadcast back to (B, 1, 1, C)."""
    B, C = t_BC.shape
    t = t_BC.reshape(B, num_groups, C // num_groups).sum(-1, keepdims=True)
    return jnp.broadcast_to(t, (B, num_groups, C // num_groups)).reshape(B, 1, 1, C)


# The matrix of _group_means_one_point holds 2G copies of the activation: worth it for few groups
# (MNIST UNets: 4), not for the CIFAR-10 UNet's 32 (measured in benchmarks/README.md).
ONE_POINT_MAX_GROUPS = 8


def _group_means_one_point(ct, xhat, scale, num_groups, n):
    """Both group means of the backward at one primal point as one matrix product.

    With a single primal image (a dense Jacobian, Lanczos: many cotangents pulled back through
    one point, ``vmap`` adds their batch axis to ``ct`` only), ``sum(g)`` and ``sum(g * xhat)``
    per group are ``ct.ravel() @ M`` with a fixed (H*W*C, 2G) matrix ``M``; batched over the
    cotangents this is one skinny matrix product that reads the cotangents once.
    """
    _, H, W, C = ct.shape
    ind = jnp.repeat(jnp.eye(num_groups, dtype=ct.dtype), C // num_groups, axis=0)  # (C, G)
    ind = ind * scale.reshape(C, 1)
    cols = jnp.concatenate([jnp.broadcast_to(ind, (H * W, C, num_groups)),
                            xhat.reshape(H * W, C, 1) * ind.reshape(1, C, num_groups)], axis=-1)
    sums = jnp.dot(ct.reshape(1, H * W * C), cols.reshape(H * W * C, 2 * num_groups),
                   precision=lax.Precision.HIGHEST)
    mg = jnp.repeat(sums[:, :num_groups], C // num_groups, axis=1).reshape(1, 1, 1, C) / n
    mgx = jnp.repeat(sums[:, num_groups:], C // num_groups, axis=1).reshape(1, 1, 1, C) / n
    return mg, mgx


def _group_norm_bwd(num_groups, eps, res, ct):
    x, mean, rstd, scale = res
    B, H, W, C = x.shape
    per_channel = lambda t: jnp.broadcast_to(t, (B, 1, 1, num_groups, C // num_groups)
                                             ).reshape(B, 1, 1, C)
    mean_c, rstd_c = per_channel(mean), per_channel(rstd)
    xhat = (x - mean_c) * rstd_c
    g = ct * scale.reshape(1, 1, 1, C)
    # Reductions over (H, W) first, channels innermost, then over the channels of each group:
    # XLA:CPU runs these several times faster than one reduction over (H, W, C/G).
    n = H * W * (C // num_groups)
    if B == 1 and num_groups <= ONE_POINT_MAX_GROUPS:
        mg, mgx = _group_means_one_point(ct, xhat, scale, num_groups, n)
    else:
        mg = _group_sum(g.sum((1, 2)), num_groups) / n
        mgx = _group_sum((g * xhat).sum((1, 2)), num_groups) / n
    dx = rstd_c * (g - mg - xhat * mgx)
    # the affine part through jax.vjp, which also reduces over devices inside shard_map
    _, affine_vjp = jax.vjp(lambda s, b: xhat * s.reshape(1, 1, 1, C) + b.reshape(1, 1, 1, C),
                            scale, jnp.zeros_like(scale))
    dscale, dbias = affine_vjp(ct)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """``nn.GroupNorm(num_groups, epsilon, use_fast_variance=False)`` on NHWC input, pulled back by
    :func:`group_norm`'s closed form.

    Same parameter names, shapes and initialisers (``scale`` ones, ``bias`` zeros, (C,)) and the
    same forward values, so it loads ``nn.GroupNorm``'s parameters: the UNet uses it in place of
    ``nn.GroupNorm`` when built with ``fast_vjp=True``.
    """

    num_groups: int
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        if x.ndim != 4 or C % self.num_groups:
            raise ValueError(f"GroupNorm: expected NHWC input with channels divisible by "
                             f"{self.num_groups} groups, got shape {x.shape}")
        scale = self.param("scale", nn.initializers.ones, (C,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
        return group_norm(x, scale, bias, self.num_groups, float(self.epsilon))


def upsample_nearest2x_plain(x):
    """(B, H, W, C) -> (B, 2H, 2W, C), every pixel repeated 2x2 (autodiff-able both ways)."""
    B, H, W, C = x.shape
    up = jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return up.reshape(B, 2 * H, 2 * W, C)


@jax.custom_vjp
def upsample_nearest2x(x):
    """:func:`upsample_nearest2x_plain` whose VJP adds the cotangent's four 2x2 phases."""
    return upsample_nearest2x_plain(x)


def _upsample_fwd(x):
    return upsample_nearest2x_plain(x), None


def _upsample_bwd(_, ct):
    return (ct[:, 0::2, 0::2] + ct[:, 0::2, 1::2] + ct[:, 1::2, 0::2] + ct[:, 1::2, 1::2],)


upsample_nearest2x.defvjp(_upsample_fwd, _upsample_bwd)


def _upsample_conv_plain(x, kernel, bias):
    y = lax.conv_general_dilated(upsample_nearest2x_plain(x), kernel, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.reshape(1, 1, 1, -1)


@jax.custom_vjp
def upsample_conv3(x, kernel, bias):
    """``conv3x3(upsample_nearest2x(x)) + bias`` (padding 1, HWIO kernel), NHWC.

    The forward is exactly that composition. The input-gradient skips the high-resolution
    convolution and the 2x2 window sum: summing the transposed 3x3 convolution over each 2x2
    block equals one stride-2 convolution of the cotangent with a 4x4 kernel (the flipped,
    transposed 3x3 kernel box-summed over 2x2 shifts), 16 instead of 36 taps per input pixel.
    """
    return _upsample_conv_plain(x, kernel, bias)


def _upsample_conv_fwd(x, kernel, bias):
    return _upsample_conv_plain(x, kernel, bias), (x, kernel)


def _upsample_conv_bwd(res, ct):
    x, kernel = res
    w_t = jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3)   # (3, 3, C_out, C_in)
    k4 = jnp.zeros((4, 4) + w_t.shape[2:], w_t.dtype)
    for a in (0, 1):
        for b in (0, 1):
            k4 = k4.at[a:a + 3, b:b + 3].add(w_t)
    dx = lax.conv_general_dilated(ct, k4, (2, 2), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # parameter gradients by JAX (which also reduces over devices inside shard_map)
    _, param_vjp = jax.vjp(lambda k, b: _upsample_conv_plain(x, k, b), kernel,
                           jnp.zeros(kernel.shape[-1], kernel.dtype))
    dk, db = param_vjp(ct)
    return dx.astype(x.dtype), dk, db


upsample_conv3.defvjp(_upsample_conv_fwd, _upsample_conv_bwd)


class UpsampleConv(nn.Module):
    """Nearest 2x upsampling then ``nn.Conv(features, (3, 3), padding=1)``, pulled back by
    :func:`upsample_conv3`; the same parameters (``kernel`` (3, 3, C, features), ``bias``) and
    initialisation as that ``nn.Conv`` under the same name."""

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return upsample_conv3(x, kernel, bias)
