"""A convolution whose input-gradient stays fast inside ``lax`` loops on XLA:CPU.

Why this exists: JAX differentiates ``conv_general_dilated`` with respect to its input by
emitting another convolution whose kernel is the spatially reversed original with the ``I`` and
``O`` labels swapped in the dimension numbers (no physical transpose). Outside loops XLA:CPU
canonicalises that kernel into a new constant; inside the body of a ``while`` loop (``lax.scan``,
``fori_loop``: every sampler step, PGD iteration and EoT chunk) it does not, and the convolution
falls back to a generic emitter that is 20-30x slower (measured in ``benchmarks/README.md``:
one 32-channel 3x3 conv VJP in a 4-iteration ``fori_loop``, 165 ms vs 7 ms). This is what made
reverse-mode through a rolled ``scan`` ~4.5x slower per step than an unrolled chain.

:func:`conv_general_dilated_fast_vjp` computes the same forward convolution and, in its custom
VJP, the input cotangent as a *forward* convolution with a physically flipped and transposed
kernel (canonical ``HWIO`` labels), which XLA:CPU runs at full speed everywhere. Its outputs and
gradients equal ``lax.conv_general_dilated``'s to float rounding (tested).

The price of ``jax.custom_vjp``: forward-mode (``jax.jvp``, ``jax.jacfwd``) through it raises.
Models therefore use it only when built with ``fast_vjp=True``; the parameters are the same
either way, so one can build a reverse-mode twin (attacks) and a forward-mode twin (Jacobian
spectra) of one trained model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated_fast_vjp"]

# Flax's nn.Conv passes these dimension numbers for NHWC inputs and HWIO kernels.
_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))


def _is_nhwc_hwio(dimension_numbers, ndim: int) -> bool:
    if ndim != 4:
        return False
    if dimension_numbers is None:  # lax's default is NCHW/OIHW
        return False
    dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
    return dn == _NHWC_HWIO


def _vjp_lhs_padding(in_size, k_dilated, stride, out_size, pad):
    """Padding of the input-gradient convolution for one spatial axis (lhs dilation 1)."""
    out_dilated = (out_size - 1) * stride + 1
    before = k_dilated - pad[0] - 1
    after = in_size + k_dilated - 1 - out_dilated - before
    return before, after


@functools.cache
def _fast_conv(window_strides, padding, rhs_dilation, precision, preferred_element_type):
    def conv(lhs, rhs):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, rhs_dilation=rhs_dilation,
            dimension_numbers=_NHWC_HWIO, precision=precision,
            preferred_element_type=preferred_element_type)

    @jax.custom_vjp
    def f(lhs, rhs):
        return conv(lhs, rhs)

    def fwd(lhs, rhs):
        return conv(lhs, rhs), (lhs, rhs)

    def bwd(res, ct):
        lhs, rhs = res
        kh, kw = rhs.shape[:2]
        k_dil = [(k - 1) * d + 1 for k, d in zip((kh, kw), rhs_dilation, strict=True)]
        pads = [_vjp_lhs_padding(lhs.shape[1 + a], k_dil[a], window_strides[a],
                                 ct.shape[1 + a], padding[a]) for a in range(2)]
        # the flipped kernel with I and O physically swapped: a canonical HWIO forward conv
        rhs_t = jnp.swapaxes(jnp.flip(rhs, (0, 1)), 2, 3)
        d_lhs = lax.conv_general_dilated(
            ct, rhs_t, (1, 1), pads, lhs_dilation=window_strides, rhs_dilation=rhs_dilation,
            dimension_numbers=_NHWC_HWIO, precision=precision,
            preferred_element_type=preferred_element_type)
        d_rhs = jax.vjp(lambda r: conv(lhs, r), rhs)[1](ct)[0]
        return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)

    f.defvjp(fwd, bwd)
    return f


def conv_general_dilated_fast_vjp(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                  rhs_dilation=None, dimension_numbers=None,
                                  feature_group_count=1, batch_group_count=1, precision=None,
                                  preferred_element_type=None):
    """Drop-in for ``lax.conv_general_dilated`` (``nn.Conv(conv_general_dilated=...)``).

    NHWC inputs with HWIO kernels, no input dilation and no feature or batch groups take the
    custom VJP described in the module docstring; any other configuration is passed to
    ``lax.conv_general_dilated`` unchanged.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type: as
        ``jax.lax.conv_general_dilated``.

    Returns:
      The convolution, identical in value to ``lax.conv_general_dilated``.
    """
    plain = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    lhs_dilation = tuple(lhs_dilation or (1,) * (lhs.ndim - 2))
    if (not _is_nhwc_hwio(dimension_numbers, lhs.ndim) or any(d != 1 for d in lhs_dilation)
            or feature_group_count != 1 or batch_group_count != 1):
        return plain()
    strides = tuple(int(s) for s in window_strides)
    rhs_dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
    k_dil = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dilation, strict=True)]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], k_dil, strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _fast_conv(strides, padding, rhs_dilation, precision,
                      preferred_element_type)(lhs, rhs)
