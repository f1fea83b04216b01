"""The background stage: a rank-nb non-negative factorisation b f of what the neurons leave unexplained, Y - A C.

It sits in the fit loop between the spatial and the temporal update (`fit.py` composes them); it only ever touches the
movie through products with it (Y f', b' Y), so the residual Y - A C (pixels x frames) is never formed.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_EPS = 1e-12


def hals_f_step(bY: Array, bA: Array, C: Array, bb: Array, f: Array) -> Array:
    """One HALS sweep over the rows of the background traces `f`, with `b` fixed.

    Minimises `||Y - A C - b f||^2` over `f >= 0` one row at a time:
    `f_j <- max(0, f_j + (b_j' Y - b_j' A C - b_j' b f) / b_j' b)`.

    **Arguments:**

    - `bY`: `(nb, T)` the product `b' Y`.
    - `bA`: `(nb, K)` the product `b' A`.
    - `C`: `(K, T)` component traces.
    - `bb`: `(nb, nb)` the Gram matrix `b' b`.
    - `f`: `(nb, T)` the current background traces.

    **Returns:** the updated `f`, `(nb, T)`, non-negative.
    """
    bb, f = jnp.asarray(bb), jnp.asarray(f)
    target = jnp.asarray(bY) - jnp.asarray(bA) @ jnp.asarray(C)  # b'(Y - A C), (nb, T)

    def row(j, f):
        grad = target[j] - bb[j] @ f
        new = jnp.maximum(f[j] + grad / jnp.maximum(bb[j, j], _EPS), 0.0)
        return f.at[j].set(jnp.where(bb[j, j] > _EPS, new, f[j]))

    return jax.lax.fori_loop(0, f.shape[0], row, f)


def hals_b_step(Yf: Array, A: Array, Cf: Array, b: Array, ff: Array) -> Array:
    """One HALS sweep over the columns of the background footprints `b`, with `f` fixed.

    `b_j <- max(0, b_j + (Y f_j' - A C f_j' - b f f_j') / f_j f_j')`.

    **Arguments:**

    - `Yf`: `(d, nb)` the product `Y f'`.
    - `A`: `(d, K)` component footprints.
    - `Cf`: `(K, nb)` the product `C f'`.
    - `b`: `(d, nb)` the current background footprints.
    - `ff`: `(nb, nb)` the Gram matrix `f f'`.

    **Returns:** the updated `b`, `(d, nb)`, non-negative.
    """
    ff, b = jnp.asarray(ff), jnp.asarray(b)
    target = jnp.asarray(Yf) - jnp.asarray(A) @ jnp.asarray(Cf)  # (Y - A C) f', (d, nb)

    def col(j, b):
        grad = target[:, j] - b @ ff[:, j]
        new = jnp.maximum(b[:, j] + grad / jnp.maximum(ff[j, j], _EPS), 0.0)
        return b.at[:, j].set(jnp.where(ff[j, j] > _EPS, new, b[:, j]))

    return jax.lax.fori_loop(0, b.shape[1], col, b)


def normalize_background(b: Array, f: Array) -> tuple[Array, Array]:
    """Scale each background footprint to unit l2 norm, moving the scale into its trace (the product is unchanged).

    **Arguments:**

    - `b`: `(d, nb)` background footprints; `f`: `(nb, T)` background traces.

    **Returns:** `(b, f)` with `||b_j|| = 1` (columns that are all zero are left at zero).
    """
    norms = jnp.linalg.norm(b, axis=0)
    safe = jnp.where(norms > _EPS, norms, 1.0)
    return b / safe, f * safe[:, None]


def init_background(Yr: Array, A: Array, C: Array, *, nb: int = 1) -> tuple[Array, Array]:
    """A starting point for `update_background` when there is none: the time-average of `Y - A C`, flat in time.

    The first footprint is the clipped mean residual image; further ones (nb > 1) start as the same image modulated by
    a small deterministic ramp in time, so HALS can separate them.

    **Arguments:**

    - `Yr`: `(d, T)` movie; `A`: `(d, K)`; `C`: `(K, T)`.
    - `nb`: number of background components.

    **Returns:** `(b (d, nb), f (nb, T))`, non-negative, `b` columns of unit norm.
    """
    T = Yr.shape[1]
    mean_res = jnp.maximum(Yr.mean(axis=1) - A @ C.mean(axis=1), 0.0)
    t = jnp.linspace(0.0, 1.0, T, dtype=Yr.dtype)
    ramps = [jnp.ones_like(t)] + [1.0 + 0.1 * jnp.cos((j + 1) * jnp.pi * t) for j in range(nb - 1)]
    f = jnp.stack(ramps) / nb
    b = jnp.tile(mean_res[:, None], (1, nb))
    return normalize_background(b, f)


@eqx.filter_jit
def update_background(
    Yr: Float[Array, "d T"],
    A: Float[Array, "d K"],
    C: Float[Array, "K T"],
    b: Float[Array, "d nb"] | None = None,
    f: Float[Array, "nb T"] | None = None,
    *,
    nb: int = 1,
    n_iter: int = 3,
) -> tuple[Float[Array, "d nb"], Float[Array, "nb T"]]:
    """Fit the background: a rank-`nb` non-negative factorisation `b f` of the residual `Y - A C` by HALS.

    Each iteration is one HALS sweep on `f` (needs `b' Y`, one pass over the movie) then one on `b` (needs `Y f'`,
    a second pass). The residual is never formed: only `A (C f')`, `(b' A) C` and the small Gram matrices are used, so
    the cost is `2 n_iter` passes over `Y` plus `O((K + nb) T nb + d K nb)`. Replaces CaImAn's `nb` / `gnb` handling of
    the background in `update_spatial/temporal`. Differentiable (fixed iteration count).

    **Arguments:**

    - `Yr`: `(d, T)` movie, pixels in row-major order.
    - `A`: `(d, K)` non-negative footprints; `C`: `(K, T)` traces (both held fixed).
    - `b`, `f`: `(d, nb)`, `(nb, T)` starting background; `None` starts from `init_background` (the mean residual).
    - `nb`: background rank when `b`/`f` are not given (otherwise their shape decides).
    - `n_iter`: number of HALS iterations (each updates `f` then `b`).

    **Returns:** `(b, f)`, non-negative, each column of `b` scaled to unit l2 norm (scale moved into `f`).
    """
    if b is None or f is None:
        b, f = init_background(Yr, A, C, nb=nb)
    b = b.astype(Yr.dtype)
    f = f.astype(Yr.dtype)

    def body(_, bf):
        b, f = bf
        f = hals_f_step(b.T @ Yr, b.T @ A, C, b.T @ b, f)
        b = hals_b_step(Yr @ f.T, A, C @ f.T, b, f @ f.T)
        return normalize_background(b, f)

    return jax.lax.fori_loop(0, n_iter, body, (b, f))
