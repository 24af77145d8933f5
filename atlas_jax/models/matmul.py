"""The 2-D matmul under every weight of the decoder: x [M, I] times a weight, on CPU with
its weight gradient laid out for XLA:CPU's fast matmul kernels.

XLA:CPU sends a dot to YNNPACK only when its left operand is row-major with the contracted
axis last; autodiff's weight gradient, x^T dy, contracts x's first axis, so it ran on the
slower generic (Eigen) kernels, on their own thread pool beside YNNPACK's. `dense` writes
the backward pass out: the narrower of x and dy is transposed once (M x min(I, O) values,
small beside the M x I x O multiply-adds) and kept from being folded back into the dot, so
every matmul of a training step is a YNNPACK one. Remat policies see its forward as the
matmul it is (dots_with_no_batch_dims_saveable keeps it). Other platforms keep autodiff's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def dense(x_MI, w, *, transposed: bool = False, out_dtype=None):
    """x_MI @ w (w [I, O]), or x_MI @ w.T (w [O, I]) when `transposed`; `out_dtype` as
    jnp.matmul's preferred_element_type."""
    if jax.default_backend() != "cpu":
        return _product(x_MI, w, transposed, out_dtype)
    return _dense_cpu(x_MI, w, transposed, out_dtype)


def _product(x_MI, w, transposed, out_dtype):
    return jnp.matmul(x_MI, w.T if transposed else w, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_cpu(x_MI, w, transposed, out_dtype):
    return _product(x_MI, w, transposed, out_dtype)


def _dense_fwd(x_MI, w, transposed, out_dtype):
    return _product(x_MI, w, transposed, out_dtype), (x_MI, w)


def _dense_bwd(transposed, out_dtype, residuals, dy_MO):
    x_MI, w = residuals
    w_IO = w.T if transposed else w
    dy_MO = dy_MO.astype(jnp.result_type(x_MI, w))
    dx_MI = (dy_MO @ w_IO.T).astype(x_MI.dtype)
    # the weight gradient from whichever of x and dy is narrower, transposed once
    I, O = w_IO.shape
    if I <= O:
        dw = copied_transpose(x_MI) @ dy_MO  # [I, O]
        as_w = not transposed
    else:
        dw = copied_transpose(dy_MO) @ x_MI  # [O, I]
        as_w = transposed
    return dx_MI, (dw if as_w else copied_transpose(dw)).astype(w.dtype)


def copied_transpose(a):
    """a with its last two axes swapped, as a copy: barriers on both sides keep XLA from
    folding the transpose into the dot that makes or reads it (either way that dot would be
    the slow form again)."""
    barrier = jax.lax.optimization_barrier
    return barrier(jnp.swapaxes(barrier(a), -1, -2))


_dense_cpu.defvjp(_dense_fwd, _dense_bwd)
