"""Noise-constrained AR(1)/AR(2) deconvolution of one calcium trace (OASIS-style pool merging in fixed-size arrays).

Temporal core of CNMF: the `jaxcnmf deconvolve` CLI calls `deconvolve_batch` on raw traces, `temporal.update_temporal`
calls `deconvolve_rows` (the same solve for traced callers: given g and sn, no threads) on each group's raw traces.

The problem (Pnevmatikakis et al. 2016; Friedrich, Zhou & Paninski 2017), for a trace y of T frames:

    minimise sum(s)  over c, b, c1   subject to  s = G c >= 0  and  ||y - c - b - c1 d||^2 <= sn^2 T,

where G is the AR(p) filter (s_t = c_t - g_1 c_{t-1} - g_2 c_{t-2}), b a constant baseline (b >= 0 by default, as in
OASIS; either sign on request, as CaImAn's CNMF runs it), c1 >= 0 the calcium at frame 0 decaying freely (d = the
kernel's impulse response), and sn the noise level. Its Lagrangian form, for a given sparsity weight lam, is

    minimise 1/2 ||y - c - b - c1 d||^2 + lam sum(s)   subject to  s = G c >= 0.

How it is solved:

1. For a fixed (lam, b), the penalty only shifts the data (sum(s) = a'c with a_t = 1 - g_1 - g_2 except at the end),
   and the non-negativity of s is handled by pool-adjacent-violators: frames are pushed one by one as new pools (runs
   where the calcium decays freely from one value v); while the spike at the start of the top pool is negative the two
   top pools are merged, the merged value being the least-squares fit. The state machine is one bounded
   `lax.while_loop` with fixed-size arrays (every step pushes or merges: at most 2T steps, O(1) work each), so it
   vmaps. An estimated c1 is simply an unpenalised first spike.
2. On a fixed pool structure the solution is a linear map M of the shifted data, so the residual is affine in (lam, b):
   b follows from sum(r) = 0 (or is held at 0 when that would make it negative and b >= 0 is asked for) and lam from
   the quadratic ||r(lam)||^2 = sn^2 T, in closed form. For AR(1), M is an orthogonal projection onto the pools, so
   the sums this needs come from the pools' own running sums (no pass over the frames). Steps 1 and 2 alternate
   until the pool structure no longer changes, which is the exact optimum of the convex problem (the structure is a
   fixed point: pool-adjacent-violators at that (lam, b) returns it, and (lam, b) are optimal on it). Long traces
   (T >= 4096; exact AR(2): from 1,024 frames, `_exact_prefix_length`) start from the (b, lam) of their first 1,024
   frames (a quarter of shorter ones), which saves most of the full-length passes.
   For AR(1) the search is nested (`_search_nested_ar1`): the pools at a (b, lam) below the answer refine the
   answer's pools (in u_t = c_t / g^t the problem is isotonic regression, and raising b or lam subtracts a
   non-decreasing sequence), so one pass over the frames builds them and every later (b, lam) step merges pools only.
3. The returned solution is recomputed from the final pool structure with plain differentiable array code, with the
   search itself behind `stop_gradient`: `jax.grad` of anything computed from the result differentiates the exact
   solution map on the final active set (implicit differentiation), including lam's and b's dependence on y, never the
   iterations. A batch (`deconvolve_batch`, `deconvolve_rows`) evaluates AR(1) solutions and exact AR(2) supports for
   all its rows at once with frames along the first axis (`_evaluate_ar1`, `_evaluate_ar2`), where each step of a
   recursion or banded solve reads a contiguous row. `deconvolve_batch`, whose inputs are concrete, takes an AR(1)
   solution's (b, lam) from the nested search's last step instead of solving for them again (no gradient there).

AR(1) pool merging is exact. For AR(2) a pool's values also depend on the calcium before it, so greedy merging (the
rule of Friedrich et al. 2017) is only close; here it is a warm start for an exact primal-dual active-set method on
the dual, a box-constrained QP whose Hessian G G' is pentadiagonal (each step one O(T) banded solve, usually a few
steps; block principal pivoting's backup rule keeps it from cycling), started from one greedy pass at the prefix's
(b, lam) on long traces. A batch runs this alternation for all its rows at once in time-major layout
(`_alternate_exact`), its last steps on the few rows still moving (`_NARROW_LANES`). The tests certify optimality with
a duality gap.

`deconvolve_batch` runs on CPU vmapped blocks of at most `CPU_BLOCK_ROWS` rows, one per core at a time (a thread pool):
XLA runs a vmapped sequential loop on one core, and small blocks stay in cache and wait less for their slowest row.

`s_min > 0` is the thresholded variant (OASIS-style): pools whose starting spike is below `s_min` are merged into the
pool before (greedy pools for AR(2) too), so every reported spike is 0 or >= s_min. It is a heuristic for a non-convex
problem, not an exact l0 solution, and the noise budget may then be out of reach (lam drops to 0).

Degenerate cases: when the budget cannot be met even with lam = 0 (sn far too small) lam = 0 is returned with the
non-negative least-squares fit; when c = 0 already meets it (flat or all-zero traces) c = s = 0 and lam is not
determined (the starting value, 0, is returned).
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._threads import Pool, host_threads
from .errors import ParameterError, TraceError
from . import noise
from .noise import _roots_to_ar, _to_float, ar_roots

__all__ = ["DeconvResult", "deconvolve", "deconvolve_batch"]


class DeconvResult(eqx.Module):
    """The deconvolution of one trace (or, from `deconvolve_batch`, of N traces: every field gains a leading axis N).

    **Fields:**

    - `c`: `(T,)` denoised calcium, including the free decay `c1 * d` of the initial value (0 at padded frames).
    - `s`: `(T,)` spikes `s = G c >= 0` beyond the initial value (s[0] = 0 when c1 is estimated: it is in c1).
    - `b`: `()` baseline.
    - `c1`: `()` initial calcium value at frame 0.
    - `g`: `(p,)` AR coefficients used.
    - `sn`: `()` noise standard deviation used.
    - `lam`: `()` sparsity weight of the equivalent penalised problem (meets the noise constraint when it was free).
    """

    c: Float[Array, " T"]
    s: Float[Array, " T"]
    b: Float[Array, ""]
    c1: Float[Array, ""]
    g: Float[Array, " p"]
    sn: Float[Array, ""]
    lam: Float[Array, ""]


# ----------------------------------------------------------------------------------------------------------------------
# The AR kernel and its running sums
# ----------------------------------------------------------------------------------------------------------------------


class _Kernel(eqx.Module):
    """The AR impulse response h (h_0 = 1, h_k = g_1 h_{k-1} + g_2 h_{k-2}, h_{-1} = h_{-2} = 0) and its running sums
    H2[l] = sum_{k<l} h_k^2, H11[l] = sum_{k<l} h_k h_{k-1}, as used by the pool arithmetic.

    AR(1) uses closed forms (h_k = g^k), which need no table look-ups; AR(2) looks them up in tables
    (`hh[k + 2] = h_k` for k = -2..T, `H2_tab`, `H11_tab` of length T + 1).
    """

    hh: Float[Array, " T+3"]
    H2_tab: Float[Array, " T+1"]
    H11_tab: Float[Array, " T+1"]
    g1: Float[Array, ""]
    g2: Float[Array, ""]
    ar1: bool = eqx.field(static=True)

    def h(self, k):
        """h_k for integer k >= -2 (array or scalar)."""
        if self.ar1:
            return jnp.where(k >= 0, jnp.exp(jnp.maximum(k, 0) * jnp.log(self.g1)), 0).astype(self.g1.dtype)
        return self.hh[k + 2]

    def H2(self, l):
        """sum_{k<l} h_k^2."""
        if self.ar1:
            lg2 = 2 * jnp.log(self.g1)
            return (jnp.expm1(l * lg2) / jnp.expm1(lg2)).astype(self.g1.dtype)
        return self.H2_tab[l]

    def H11(self, l):
        """sum_{k<l} h_k h_{k-1} (zero for AR(1), where it is only ever multiplied by g2 = 0)."""
        if self.ar1:
            return jnp.zeros(jnp.shape(l), self.g1.dtype)
        return self.H11_tab[l]


def _kernel(g: Float[Array, " p"], T: int) -> _Kernel:
    """Impulse-response tables for AR coefficients `g` (p = 1 or 2) over T frames.

    **Arguments:**
    - `g`: AR coefficients.
    - `T`: number of frames.

    **Returns:** a `_Kernel`.
    """
    g1 = g[0]
    g2 = g[1] if g.shape[0] == 2 else jnp.zeros((), g.dtype)

    def step(carry, impulse):
        h1, h2 = carry
        hk = impulse + g1 * h1 + g2 * h2
        return (hk, h1), hk

    zero = jnp.zeros((), g.dtype)
    impulse = jnp.zeros(T + 1, g.dtype).at[0].set(1)
    _, h = jax.lax.scan(step, (zero, zero), impulse)  # h_0..h_T
    hh = jnp.concatenate([jnp.zeros(2, g.dtype), h])
    hprev = hh[1 : T + 1]  # h_{-1}..h_{T-2}
    H2 = jnp.concatenate([jnp.zeros(1, g.dtype), jnp.cumsum(h[:T] ** 2)])
    H11 = jnp.concatenate([jnp.zeros(1, g.dtype), jnp.cumsum(h[:T] * hprev)])
    return _Kernel(hh=hh, H2_tab=H2, H11_tab=H11, g1=g1, g2=g2, ar1=g.shape[0] == 1)


def _penalty_weights(g: Float[Array, " p"], T: int, length, c1_free: bool) -> Float[Array, " T"]:
    """Weights a with sum(G c) = a'c over the valid frames (an unpenalised s_0 when c1 is free).

    **Arguments:**
    - `g`: AR coefficients `(p,)`, or `(p, N)` for N traces in time-major layout (then `length` is `(N,)`); `T`:
      frames; `length`: number of valid frames; `c1_free`: whether s_0 is unpenalised.

    **Returns:** a `(T,)` vector (`(T, N)`), zero at padded frames.
    """
    t = _trailing(jnp.arange(T), g.ndim)
    g1 = g[0]
    g2 = g[1] if g.shape[0] == 2 else jnp.zeros((), g.dtype)
    a = 1 - g1 * (t + 1 < length) - g2 * (t + 2 < length)
    if c1_free:
        a = a - (t == 0)
    return jnp.where(t < length, a, 0).astype(g.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Step 1: pool-adjacent-violators for a fixed shift (the non-differentiable search)
# ----------------------------------------------------------------------------------------------------------------------

# A pool is the row (t0, A, B, cp, cpp): start frame, A = sum_k h_k x_{t0+k}, B = sum_k h_{k-1} x_{t0+k}, and the
# calcium at the two frames before it (held fixed while it is the top pool). Its value (calcium at t0) for length l is
# v = (A - g2 cp H11[l]) / H2[l], and c_{t0+k} = v h_k + g2 cp h_{k-1}.


def _pool_value(ker: _Kernel, pool, l):
    """Least-squares calcium value at the start of `pool` of length `l`."""
    return (pool[1] - ker.g2 * pool[3] * ker.H11(l)) / ker.H2(l)


def _pool_tail(ker: _Kernel, v, cp, l):
    """Calcium at the last two frames of a pool of value `v`, length `l`, preceded by calcium `cp`."""
    last = v * ker.h(l - 1) + ker.g2 * cp * ker.h(l - 2)
    second = jnp.where(l >= 2, v * ker.h(l - 2) + ker.g2 * cp * ker.h(l - 3), cp)
    return last, second


def _merge(ker: _Kernel, lower, upper, l_lower):
    """The pool covering `lower` (of length `l_lower`) followed by `upper` (pools as 5-tuples)."""
    hl = ker.h(l_lower)
    if ker.ar1:
        return (lower[0], lower[1] + hl * upper[1], lower[2], lower[3], lower[4])
    hl1, hl2 = ker.h(l_lower - 1), ker.h(l_lower - 2)
    A = lower[1] + hl * upper[1] + ker.g2 * hl1 * upper[2]
    B = lower[2] + hl1 * upper[1] + ker.g2 * hl2 * upper[2]
    return (lower[0], A, B, lower[3], lower[4])


def _pav(x: Float[Array, " T"], ker: _Kernel, length, s_min, *, elem_t0=None, n_elem=None, steps=None):
    """Pool structure of min 1/2||x - c||^2 s.t. G c >= 0 (spikes after the first >= s_min, else merged).

    The two top pools live in the loop carry; the pools below them in five (T,) arrays indexed by stack position
    (separate 1-D arrays: a batched row update of a (T, 5) array is copied whole by XLA on CPU).

    The elements pushed are frames by default. For AR(1) they may instead be the pools of a finer structure
    (`elem_t0`, `n_elem`, `steps`): element i covers frames elem_t0[i] .. elem_t0[i+1] - 1 (the last up to `length`)
    and `x[i]` is its sum A = sum_k g^k x_(t0+k). Merging pools of a finer structure gives the exact result whenever
    that structure refines the solution's (see `_nested_ar1`).

    **Arguments:**
    - `x`: shifted data (zero at padded frames), or the elements' sums.
    - `ker`: kernel tables.
    - `length`: number of valid frames (>= 1).
    - `s_min`: merge threshold on spikes after frame 0 (0 for the convex problem).
    - `elem_t0`, `n_elem`: the elements' start frames `(T,)` and their number (None: the frames).
    - `steps`: loop steps (each pushes or merges: twice the number of elements suffices; default 2 T).

    **Returns:** `(starts, pinned, pools)`: which frames start a pool, whether the first pool is held at zero
    (c_0 >= 0), and the pools in time order as `(t0, A, n)`: `(T,)` start frames (T past the n-th pool) and sums
    A = sum_k h_k x_{t0+k}, and the number of pools n.
    """
    T = x.shape[0]
    dt = x.dtype
    zero = jnp.zeros((), dt)
    nfield = 2 if ker.ar1 else 5  # AR(1) pools need only (t0, A)

    if elem_t0 is None:
        n_elem, first_of = length, lambda i: i
    else:
        assert ker.ar1, "pools as elements are for AR(1) only"
        first_of = lambda i: jnp.where(i < n_elem, elem_t0[jnp.minimum(i, T - 1)], length)
    top1 = (jnp.int32(0), x[0], zero, zero, zero)[:nfield]
    top2 = (jnp.int32(0), zero, zero, zero, zero)[:nfield]
    # AR(1) keeps its stack as one interleaved (2 T,) array [t0, A, t0, A, ...] (t0 as a float: exact below 2^24
    # frames in float32): one read and one write a step instead of two each, 15 % less time per step (512 lanes)
    packed = ker.ar1 and T < 2**24
    if packed:
        stack = jnp.zeros(2 * T, dt)
    else:
        stack = (jnp.zeros(T, jnp.int32),) + tuple(jnp.zeros(T, dt) for _ in range(nfield - 1))
    # state: next frame t, number of pools n, top pool, the one below, the rest, first pool pinned at 0, finished
    state = (jnp.int32(1), jnp.int32(1), top1, top2, stack, jnp.bool_(False), jnp.bool_(False))

    def full(pool):
        return tuple(pool) + (zero,) * (5 - nfield)

    log_g = jnp.log(ker.g1)
    one_m_g2 = -jnp.expm1(2 * log_g)

    def body(state):
        i, n, top1, top2, stack, pinned, _ = state
        t = first_of(i)  # first frame of the next element (`length` past the last)
        p1, p2 = full(top1), full(top2)
        l1 = t - p1[0]
        l2 = p1[0] - p2[0]
        if ker.ar1:  # closed forms, 3 transcendentals a step: v = A (1 - g^2) / (1 - g^(2l)), spike = v1 - g^l2 v2
            v1 = jnp.where((n == 1) & pinned, 0, p1[1] * one_m_g2 / -jnp.expm1((2 * l1) * log_g))
            v2 = jnp.where((n == 2) & pinned, 0, p2[1] * one_m_g2 / -jnp.expm1((2 * l2) * log_g))
            g_l2 = jnp.exp(l2 * log_g)
            spike1 = v1 - g_l2 * v2
            merged = (p2[0], p2[1] + g_l2 * p1[1])
        else:
            v1 = jnp.where((n == 1) & pinned, 0, _pool_value(ker, p1, l1))
            spike1 = v1 - ker.g1 * p1[3] - ker.g2 * p1[4]
            merged = _merge(ker, p2, p1, l2)
        merge = (n >= 2) & (spike1 < s_min)
        pin = (n == 1) & ~pinned & (v1 < 0)
        push = ~merge & ~pin & (i < n_elem)
        done = ~merge & ~pin & ~push

        merged = merged[:nfield]
        k = jnp.maximum(n - 3, 0)
        if packed:
            pair = jax.lax.dynamic_slice(stack, (2 * k,), (2,))
            below = (pair[0].astype(jnp.int32), pair[1])
        else:
            below = tuple(a[k] for a in stack)
        if ker.ar1:
            new = (t, x[jnp.minimum(i, T - 1)])
        else:
            last, second = _pool_tail(ker, v1, p1[3], l1)
            new = (t, x[jnp.minimum(i, T - 1)], zero, last, second)

        # slot n-2 is free unless we push, when it takes top2. Writing `below` otherwise is harmless, and makes the
        # write depend on the read above, so XLA updates the stack in place instead of copying it every step.
        slot = jnp.maximum(n - 2, 0)
        if packed:
            pair = jnp.stack([jnp.where(push, top2[0], below[0]).astype(dt), jnp.where(push, top2[1], below[1])])
            stack = jax.lax.dynamic_update_slice(stack, pair, (2 * slot,))
        else:
            stack = tuple(
                a.at[slot].set(jnp.where(push, v, w), mode="promise_in_bounds") for a, v, w in zip(stack, top2, below)
            )
        pick = lambda a, b, c: jnp.where(merge, a, jnp.where(push, b, c))
        top1_next = tuple(pick(a, b, c) for a, b, c in zip(merged, new, top1))
        top2_next = tuple(pick(a, b, c) for a, b, c in zip(below, top1, top2))
        n = n + push.astype(jnp.int32) - merge.astype(jnp.int32)
        i = i + push.astype(jnp.int32)
        return i, n, top1_next, top2_next, stack, pinned | pin, done

    # A number of steps fixed for the whole batch (n - 1 pushes, at most n - 1 merges, one pin) rather than a while
    # loop: under vmap a while loop with a per-trace condition selects the whole carry (the stack arrays) every step.
    steps = 2 * T if steps is None else steps
    _, n, top1, top2, stack, pinned, _ = jax.lax.fori_loop(0, steps, lambda k, st: body(st), state)
    if packed:
        stack = (stack[0::2].astype(jnp.int32), stack[1::2])
    t0 = stack[0]
    t0 = t0.at[jnp.where(n >= 2, n - 2, T)].set(top2[0], mode="drop")
    t0 = t0.at[n - 1].set(top1[0])
    t0 = jnp.where(jnp.arange(T) < n, t0, T)
    A = stack[1]
    A = A.at[jnp.where(n >= 2, n - 2, T)].set(top2[1], mode="drop")
    A = A.at[n - 1].set(top1[1])
    starts = jnp.zeros(T, bool).at[t0].set(True, mode="drop")
    return starts, pinned, (t0, A, n)


# ----------------------------------------------------------------------------------------------------------------------
# Step 2: the solution on a fixed pool structure (plain array code: differentiable, vectorised over frames)
# ----------------------------------------------------------------------------------------------------------------------


# scan unrolling of the banded solves and linear recurrences: 2 halved a 64-row band solve at 10,000 frames
# (30 -> 14 ms; 1.3x at 500 rows); 3, 4 and 8 were slower than 2
_UNROLL = 2


def _linear_recurrence(a, b, reverse=False):
    """z_t = a_t z_{t-1} + b_t (z_{t+1} when `reverse`) from z = 0, along the first axis, by a sequential scan (on CPU
    cheaper than a log-depth `associative_scan`, which passes over the whole array about 2 log2(T) times)."""

    def step(z, ab):
        z = ab[0] * z + ab[1]
        return z, z

    return jax.lax.scan(step, jnp.zeros_like(b[0]), (a, b), reverse=reverse, unroll=_UNROLL)[1]


def _pool_projection_ar1(cols, starts, pinned, g, length):
    """M u for AR(1) pool structures of N traces, in time-major layout: each column u of `cols` projected onto its
    trace's pools' decaying kernels (pools are independent for AR(1): no scatter or gather).

    Two sequential scans over the frames: backwards, the pools' sums A_u = sum_k g^k u_(t0+k) and their lengths l
    (restarted at each pool's end); forwards, the kernels scaled by A_u / H2(l) from each pool's start (0 on a pinned
    first pool). With frames along the first axis every step reads one contiguous row (vmapped over lane-major (N, T)
    traces each step gathered a strided column), and counting l in the backward scan replaces a reverse cumulative
    minimum (0.11 s alone on 512 x 10,000 traces, one core).

    **Arguments:**
    - `cols`: tuple of `(T, N)` arrays, zero at padded frames; `starts`: `(T, N)` pool starts; `pinned`, `g`,
      `length`: `(N,)`.

    **Returns:** a tuple like `cols`, zero at padded frames.
    """
    T, N = starts.shape
    dt = cols[0].dtype
    t = jnp.arange(T)[:, None]
    mask = t < length[None, :]
    ends = jnp.concatenate([starts[1:], jnp.ones((1, N), bool)]) | (t + 1 >= length[None, :])
    zeros = jnp.zeros(N, dt)

    def backward(carry, row):
        keep, *us = row
        gk = jnp.where(keep, g, 0)
        carry = tuple(gk * A + u for A, u in zip(carry[:-1], us)) + (jnp.where(keep, carry[-1], 0) + 1,)
        return carry, carry

    init = (zeros,) * len(cols) + (jnp.zeros(N, jnp.int32),)
    _, (*A, l) = jax.lax.scan(backward, init, (~ends,) + tuple(cols), reverse=True, unroll=_UNROLL)
    lg2 = 2 * jnp.log(g)[None, :]
    w = jnp.where(starts & ~((t == 0) & pinned[None, :]), jnp.expm1(lg2) / jnp.expm1(l * lg2), 0).astype(dt)

    def forward(carry, row):
        start, *vs = row
        gk = jnp.where(start, 0, g)
        carry = tuple(gk * c + v for c, v in zip(carry, vs))
        return carry, carry

    _, M = jax.lax.scan(forward, (zeros,) * len(cols), (starts,) + tuple(w * a for a in A), unroll=_UNROLL)
    return tuple(jnp.where(mask, m, 0) for m in M)


def _on_pools(xs: Float[Array, "T m"], starts, pinned, ker: _Kernel, length) -> Float[Array, "T m"]:
    """Apply the linear map M: shifted data -> calcium, for the pool structure `starts` (each column of `xs`).

    **Arguments:**
    - `xs`: `(T, m)` right-hand sides, zero at padded frames.
    - `starts`, `pinned`: the pool structure from `_pav`.
    - `ker`: kernel tables; `length`: number of valid frames.

    **Returns:** `(T, m)` calcium, zero at padded frames.
    """
    T = xs.shape[0]
    t = jnp.arange(T)
    if ker.ar1:  # `_pool_projection_ar1` on each column as a batch of one trace
        col = lambda v: jnp.reshape(v, (1,))  # noqa: E731
        M = _pool_projection_ar1(tuple(xs[:, k : k + 1] for k in range(xs.shape[1])), starts[:, None], col(pinned),
                                 col(ker.g1), col(length))
        return jnp.concatenate(M, axis=1)
    t0 = jax.lax.cummax(jnp.where(starts, t, 0))  # start of the pool holding t
    k = t - t0
    nxt = jax.lax.cummin(jnp.where(starts, t, length)[::-1])[::-1]  # first start >= t
    next_start = jnp.concatenate([nxt[1:], jnp.full((1,), length, nxt.dtype)])
    l = jnp.clip(next_start - t, 1, T)  # pool length, meaningful at pool starts
    hk = ker.h(k)
    A = jax.ops.segment_sum(hk[:, None] * xs, t0, num_segments=T)
    A = A * jnp.where((t == 0) & pinned, 0, 1).astype(xs.dtype)[:, None]
    H2 = ker.H2(l)[:, None]
    if_start = starts[:, None]
    # calcium before each pool: the affine recursion cp' = alpha cp + beta over pools, in time order (AR(2) only)
    H11 = ker.H11(l)[:, None]
    hl1, hl2 = ker.h(l - 1)[:, None], ker.h(l - 2)[:, None]
    alpha = jnp.where(if_start, ker.g2 * (hl2 - H11 * hl1 / H2), 1) * jnp.ones_like(xs)
    beta = jnp.where(if_start, A / H2 * hl1, 0)

    def compose(earlier, later):
        a1, b1 = earlier
        a2, b2 = later
        return a2 * a1, a2 * b1 + b2

    _, beta_inc = jax.lax.associative_scan(compose, (alpha, beta))
    cp = jnp.concatenate([jnp.zeros_like(xs[:1]), beta_inc[:-1]])  # cp at each pool start (composition before it)
    v = (A - ker.g2 * cp * H11) / H2
    c = v[t0] * hk[:, None] + ker.g2 * cp[t0] * ker.h(k - 1)[:, None]
    return jnp.where((t < length)[:, None], c, 0)


# AR(2), exactly: the dual of min 1/2||x - c||^2 + lam q'G c s.t. G c >= 0 is the box QP
#     min_mu 1/2 mu'H mu - mu'G x  s.t.  mu <= lam q,   H = G G' (pentadiagonal),   c = x - G'mu,  s = G c,
# with s_t > 0 only where mu_t = lam q_t (the "active" frames, the spike support). On a fixed support A (free set F),
# c is the orthogonal projection of the shifted data onto {c : (G c)_F = 0}: P z = z - G_F' H_FF^{-1} (G z)_F.


def _trailing(x, ndim: int):
    """x with trailing unit axes added up to `ndim` dimensions (a per-frame or per-lane array against one with extra
    right-hand-side columns)."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


# The AR(2) functions below take the frames on the first axis and broadcast over the rest: one trace is `(T,)` (or
# `(T, m)` for m right-hand sides) with scalar g1, g2; a batch in time-major layout is `(T, N)` (or `(T, N, m)`) with
# `(N,)` g1, g2, masks and supports `(T, N)`. The batch runs the scans once for all lanes, without the transposes a
# vmapped scan over `(N, T)` traces makes at every call (one banded solve, 64 x 10,000 frames on one core: 7.8 ms
# time-major, 14.1 ms vmapped).


def _lane_shapes(g1, g2, mask, z):
    """g1, g2 (scalars or per lane) and `mask` (`(T, ...)`) shaped to broadcast against `z` (`mask`'s shape, possibly
    with trailing right-hand-side columns)."""
    return _trailing(g1, z.ndim - 1), _trailing(g2, z.ndim - 1), _trailing(mask, z.ndim)


def _G(g1, g2, z, mask):
    """s = G z along the first axis (z zero at padded frames)."""
    g1, g2, mask = _lane_shapes(g1, g2, mask, z)
    z1 = jnp.concatenate([jnp.zeros_like(z[:1]), z[:-1]])
    z2 = jnp.concatenate([jnp.zeros_like(z[:2]), z[:-2]])
    return jnp.where(mask, z - g1 * z1 - g2 * z2, 0)


def _Gt(g1, g2, v, mask):
    """G' v along the first axis (v zero at padded frames)."""
    g1, g2, mask = _lane_shapes(g1, g2, mask, v)
    v = jnp.where(mask, v, 0)
    v1 = jnp.concatenate([v[1:], jnp.zeros_like(v[:1])])
    v2 = jnp.concatenate([v[2:], jnp.zeros_like(v[:2])])
    return v - g1 * v1 - g2 * v2


def _band_solve(g1, g2, free, rhs):
    """Solve H_FF mu_F = rhs_F (mu = 0 off F) for H = G G', by a banded LDL' factorisation (two O(T) scans).

    **Arguments:**
    - `g1`, `g2`: the kernel, scalars or one per lane; `free`: `(T, ...)` bool, the free set F (padded frames are
      never free).
    - `rhs`: right-hand sides, `free`'s shape or with trailing columns.

    **Returns:** the solution, shaped like `rhs`, zero off F.
    """
    T = free.shape[0]
    dt = rhs.dtype
    t = _trailing(jnp.arange(T), free.ndim)
    free1 = jnp.concatenate([jnp.zeros_like(free[:1]), free[:-1]])
    free2 = jnp.concatenate([jnp.zeros_like(free[:2]), free[:-2]])
    d0 = jnp.where(free, 1 + g1**2 * (t >= 1) + g2**2 * (t >= 2), 1).astype(dt)
    d1 = jnp.where(free & free1, -g1 + g1 * g2 * (t >= 2), 0).astype(dt)
    d2 = jnp.where(free & free2, -g2, 0).astype(dt)
    extra = rhs.ndim - free.ndim
    col = lambda x: _trailing(x, x.ndim + extra)  # noqa: E731  (a step's coefficients against its rhs columns)
    rhs = jnp.where(_trailing(free, rhs.ndim), rhs, 0)
    one = jnp.ones(free.shape[1:], dt)

    def forward(carry, inp):
        D1, D2, l1p, z1, z2 = carry
        a0, a1, a2, r = inp
        l2 = a2 / D2
        l1 = (a1 - l2 * l1p * D2) / D1
        D = a0 - l1**2 * D1 - l2**2 * D2
        z = r - col(l1) * z1 - col(l2) * z2
        return (D, D1, l1, z, z1), (l1, l2, D, z)

    zero_m = jnp.zeros(rhs.shape[1:], dt)
    _, (l1, l2, D, z) = jax.lax.scan(forward, (one, one, 0 * one, zero_m, zero_m), (d0, d1, d2, rhs), unroll=_UNROLL)
    w = z / _trailing(D, rhs.ndim)
    l1n = jnp.concatenate([l1[1:], jnp.zeros_like(l1[:1])])  # l1_{t+1}
    l2n = jnp.concatenate([l2[2:], jnp.zeros_like(l2[:2])])  # l2_{t+2}

    def backward(carry, inp):
        m1, m2 = carry
        wt, a, b = inp
        m = wt - col(a) * m1 - col(b) * m2
        return (m, m1), m

    _, mu = jax.lax.scan(backward, (zero_m, zero_m), (w, l1n, l2n), reverse=True, unroll=_UNROLL)
    return jnp.where(_trailing(free, rhs.ndim), mu, 0)


def _project(g1, g2, xs, active, mask):
    """P applied to `xs` (`mask`'s shape plus trailing columns): least-squares calcium whose spikes vanish off the
    support `active`."""
    mu = _band_solve(g1, g2, mask & ~active, _G(g1, g2, xs, mask))
    return jnp.where(_trailing(mask, xs.ndim), xs - _Gt(g1, g2, mu, mask), 0)


def _pdas(x, g1, g2, q, lam, active, mask, max_steps: int, running=None):
    """Spike support of min 1/2||x - c||^2 + lam q'G c s.t. G c >= 0, by a primal-dual active-set method on the dual.

    Each step fixes mu = lam q on the support, solves for mu elsewhere (a banded solve), then keeps support frames whose
    spike is positive and adds free frames whose mu exceeds its bound; it stops when no frame is on the wrong side (the
    KKT conditions then hold). H is not an M-matrix, so plain block exchanges can cycle: after three steps without
    fewer wrong frames only the last wrong frame is exchanged (Judice & Pires' backup rule for block principal
    pivoting), which terminates. Warm-started from a nearby support it needs few steps.

    **Arguments:**
    - `x`: `(T,)` data minus baseline (NOT shifted by lam), or `(T, N)` for N lanes in time-major layout (then `g1`,
      `g2`, `lam` are `(N,)` and `q`, `active`, `mask` `(T, N)`); `g1`, `g2`: kernel; `q`: penalty per spike;
      `lam`: weight; `active`: starting support.
    - `mask`: valid frames; `max_steps`: bound on the number of steps.
    - `running`: lanes to solve (`(N,)` bool; None: all). The others keep `active` as given.

    **Returns:** the support, shaped like `x`.
    """
    f = _G(g1, g2, x, mask)
    u = lam * q
    tol = 64 * jnp.finfo(x.dtype).eps * (jnp.max(jnp.abs(f), axis=0) + lam + 1)

    def step(active, running, best, fails, f, u, tol, mask, g1, g2):
        """One active-set step for the lanes given (all of them, or the few still running: see below)."""
        t = _trailing(jnp.arange(T), f.ndim)
        H = lambda v: _G(g1, g2, _Gt(g1, g2, v, mask), mask)  # noqa: E731
        free = mask & ~active
        fixed = jnp.where(active, u, 0)
        mu = _band_solve(g1, g2, free, f - H(fixed)) + fixed
        s = f - H(mu)
        wrong = mask & ((active & (s <= -tol)) | (free & (mu > u + tol)))  # frames on the wrong side
        n_wrong = jnp.sum(wrong, axis=0, dtype=jnp.int32)
        # Block exchange while the number of wrong frames keeps falling; after 3 steps without a new low, exchange
        # only the last wrong frame (the backup rule of block principal pivoting), which cannot cycle.
        improved = n_wrong < best
        fails = jnp.where(improved, 0, fails + 1)
        best = jnp.minimum(best, n_wrong)
        last = jnp.max(jnp.where(wrong, t, -1), axis=0)
        flip = jnp.where(fails >= 3, t == last, wrong) & running  # lanes already solved stay as they are
        return active ^ flip, running & (n_wrong > 0), best, fails

    T = x.shape[0]
    lanes = x.shape[1:]
    per_lane = (f, u, jnp.broadcast_to(tol, lanes), mask, jnp.broadcast_to(g1, lanes), jnp.broadcast_to(g2, lanes))
    n_narrow = _NARROW_LANES if x.ndim == 2 and lanes[0] >= 2 * _NARROW_LANES else 0

    def full(state):
        active, running, best, fails = state
        return step(active, running, best, fails, *per_lane)

    def narrow(state):
        """The step on the `n_narrow` first running lanes only (gathered, then written back): late in a batch's
        search a few lanes take the last steps, and a full-width banded solve costs every lane's work."""
        sel = jnp.argsort(~state[1])[:n_narrow]
        pick = lambda v: v[..., sel] if v.ndim == 2 else v[sel]  # noqa: E731
        new = step(*(pick(v) for v in state + per_lane))
        return tuple(v.at[..., sel].set(w) if v.ndim == 2 else v.at[sel].set(w) for v, w in zip(state, new))

    def body(state):
        active, running, it, best, fails = state
        inner = (active, running, best, fails)
        if n_narrow:
            inner = jax.lax.cond(jnp.sum(running) <= n_narrow, narrow, full, inner)
        else:
            inner = full(inner)
        active, running, best, fails = inner
        return active, running, it + 1, best, fails

    def cond(state):
        return jnp.any(state[1]) & (state[2] < max_steps)

    running = jnp.ones(lanes, bool) if running is None else running
    init = (active & mask, running, jnp.int32(0), jnp.full(lanes, T + 1, jnp.int32), jnp.zeros(lanes, jnp.int32))
    active, _, _, _, _ = jax.lax.while_loop(cond, body, init)
    return active


_NARROW_LANES = 4
"""`_pdas` on a batch of N >= 8 lanes takes its steps on 4 gathered lanes once no more are running: the last steps
of a batch's search are mostly one lane's backup exchanges. 64 x 10,000 AR(2) traces, one core: alternation 0.51 s
at full width, 0.49 / 0.42 / 0.40 s narrowed to 16 / 8 / 4 lanes (the same supports, bit for bit)."""


class _ExactStart(eqx.Module):
    """Where the exact AR(2) alternation starts, per trace (`_search` with `start_only`): the data centred at the first
    baseline guess `y_s`, the penalty weights `a_s` and per-spike penalties `q_s` (`(T,)`), the first (b, lam) (b
    relative to `b_start`) and the first support `active` (greedy pool merging at that (b, lam))."""

    y_s: Array
    a_s: Array
    q_s: Array
    b: Array
    lam: Array
    active: Array
    b_start: Array


def _alternate_exact(start: _ExactStart, g1, g2, sn, lam_fix, length, *, b_free, lam_free: bool, max_iter: int):
    """Exact AR(2) search: alternate the active-set search (`_pdas`) with the closed-form (b, lam) update until the
    support is a fixed point (or (b, lam) are reproduced by it), at most `max_iter` times.

    One trace (`start`'s arrays `(T,)`, scalars elsewhere) or N lanes in time-major layout (`(T, N)` and `(N,)`): the
    lanes run in lockstep, a lane that has converged keeps its state while the others go on (as `vmap` would), and
    takes no part in the active-set steps. `b_free` may be "nonneg" (b >= 0, i.e. b >= -b_start relative).

    **Returns:** the spike support, shaped like `start.y_s`.
    """
    y_s, a_s, q = start.y_s, start.a_s, start.q_s
    dt = y_s.dtype
    T = y_s.shape[0]
    mask = _trailing(jnp.arange(T), y_s.ndim) < length
    length_f = jnp.asarray(length).astype(dt)
    rhs = jnp.stack([y_s, mask.astype(dt), a_s], axis=-1)
    zero = jnp.zeros_like(start.b)
    floor = -start.b_start
    steps = max(4 * max_iter, 50)

    def pdas(b, lam, prev, running):
        return _pdas(jnp.where(mask, y_s - b, 0), g1, g2, q, lam, prev, mask, steps, running)

    def body(state):
        b, lam, prev, it, done = state
        active = pdas(b, lam, prev, ~done)
        same = jnp.all(active == prev, axis=0) & (it > 0)
        Mx = _project(g1, g2, rhs, active, mask)
        head = (y_s, a_s, (Mx[..., 0], Mx[..., 1], Mx[..., 2]), mask, sn, length_f)
        b_new, lam_new = _b_lam(functools.partial(_update_b_lam, axis=0), head, b, lam, zero, lam_fix, b_free=b_free,
                                lam_free=lam_free, floor=floor)
        fixed = _b_lam_settled(b_new, b, lam_new, lam, jnp.abs(b - floor) + sn)
        keep = lambda old, new: jnp.where(done, old, new)  # noqa: E731  (converged lanes keep their state)
        return keep(b, b_new), keep(lam, lam_new), keep(prev, active), it + 1, done | same | (fixed & (it > 0))

    def cond(state):
        return jnp.any(~state[-1]) & (state[3] < max_iter)

    running = jnp.ones(y_s.shape[1:], bool)
    if not (b_free or lam_free):
        return pdas(start.b, start.lam, start.active & mask, running)
    init = (start.b, start.lam, start.active & mask, jnp.int32(0), ~running)
    return jax.lax.while_loop(cond, body, init)[2]


def _update_b_lam(y, a, Mx, mask, sn, length, b, lam, b_fix, lam_fix, *, b_free: bool, lam_free: bool,
                  axis=None):
    """Baseline and lam in closed form on a fixed pool structure.

    With c = M(y - b - lam a), the residual r = y - b - c is affine in (b, lam); b solves sum(r) = 0 and lam the
    quadratic ||r||^2 = sn^2 length (its larger root, clipped at 0).

    **Arguments:**
    - `y`: data (zero at padded frames); `a`: penalty weights; `Mx`: M applied to (y, 1, a), three arrays like `y`.
    - `mask`: valid frames; `sn`, `length`: noise level and number of valid frames.
    - `b`, `lam`: current values (kept where the closed form is undetermined); `b_fix`, `lam_fix`: fixed values.
    - `b_free`, `lam_free`: which of them are estimated.
    - `axis`: the frames' axis when the arrays hold several traces (`(T, N)` with `axis=0`; then the scalars are
      `(N,)`); None: one trace.

    **Returns:** `(b, lam)`.
    """
    dt = y.dtype
    total = lambda x: jnp.sum(x, axis=axis)
    r0 = jnp.where(mask, y - Mx[0], 0)
    e = jnp.where(mask, 1 - Mx[1], 0)
    ua = Mx[2]
    if b_free:
        den = total(e)
        ok = jnp.abs(den) > 1e-6 * length
        safe = jnp.where(ok, den, 1)
        b0 = jnp.where(ok, total(r0) / safe, b)
        b1 = jnp.where(ok, total(ua) / safe, 0)
    else:
        b0, b1 = b_fix, jnp.zeros((), dt)
    if lam_free:
        rho0 = r0 - b0 * e
        rho1 = ua - b1 * e
        qa = total(rho1 * rho1)
        qb = total(rho0 * rho1)
        qc = total(rho0 * rho0) - sn**2 * length
        lam_new = _lam_root(qa, qb, qc, lam, total(a * a))
    else:
        lam_new = lam_fix
    return b0 + b1 * lam_new, lam_new


def _lam_root(qa, qb, qc, lam, a_sq):
    """The larger root (clipped at 0) of qa lam^2 + 2 qb lam + qc = 0, the residual-energy equation in lam.

    When qa is at rounding level the residual does not depend on lam on this structure (e.g. c = 0 already meets the
    budget), so lam is undetermined and the current value `lam` is kept.
    """
    disc = qb**2 - qa * qc
    ok = qa > (1e3 * jnp.finfo(qa.dtype).eps) ** 2 * a_sq
    safe = jnp.where(ok, qa, 1)
    root = (-qb + jnp.sqrt(jnp.where(ok & (disc > 0), disc, 0))) / safe
    return jnp.maximum(jnp.where(ok, root, lam), 0)


def _b_lam(update, head, b, lam, b_fix, lam_fix, *, b_free, lam_free: bool, floor):
    """`update(*head, b, lam, b_fix, lam_fix, b_free=..., lam_free=...)` for a free, fixed or non-negative baseline.

    With `b_free="nonneg"` the baseline must stay >= `floor` (its value where the absolute baseline is 0): when the
    free update goes below, the update with b fixed at `floor` is taken. This is exact for the convex problem: the best
    objective as a function of b is convex, so when its free minimiser lies below the floor the floor is optimal.
    """
    if b_free != "nonneg":
        return update(*head, b, lam, b_fix, lam_fix, b_free=bool(b_free), lam_free=lam_free)
    b_f, lam_f = update(*head, b, lam, b_fix, lam_fix, b_free=True, lam_free=lam_free)
    b_0, lam_0 = update(*head, b, lam, floor, lam_fix, b_free=False, lam_free=lam_free)
    low = b_f < floor
    return jnp.where(low, b_0, b_f), jnp.where(low, lam_0, lam_f)


def _b_lam_settled(b_new, b, lam_new, lam, b_scale):
    """(b, lam) reproduced by the structure they gave, to rounding (a fixed point: no confirming search needed);
    `b_scale` is the magnitude b's tolerance is relative to."""
    tol = 1e-6 if b.dtype == jnp.float64 else 1e-5
    return (jnp.abs(lam_new - lam) <= tol * jnp.abs(lam)) & (jnp.abs(b_new - b) <= tol * b_scale)


def _pool_sums_ar1(t0, n, a, ker: _Kernel, mask, rows=None, nxt=None, L=None):
    """For AR(1) pools `(t0, n)` (as `_pav` returns them): which rows are pools, their lengths l, their sums
    A_1 = sum_k g^k and A_a = sum_k g^k a_(t0+k) in closed form (a is 1 - g except at the first and last frames), and
    their weights 1/H2(l) = (1 - g^2) / (1 - g^(2 l)).
    `t0` may have fewer rows than there are frames (`a`, `mask`), or be a block of rows: `rows` (their indices; default
    all) with `nxt` (the start of the row after each; default `t0` shifted up, the last row followed by none) and
    `L` (the number of valid frames, default from `mask`).

    All three from one transcendental a row: with e = g^l - 1 (`expm1`, accurate for g near 1), A_1 = -e / (1 - g),
    1 - g^(2 l) = -e (2 + e) and g^(l - 1) = (1 + e) / g (was three `exp`/`expm1` a row; 512 x 10,000 traces on one
    core: 1.18 -> 1.16 s in all).

    **Returns:** `(in_use, l, A1, Aa, w)`, each shaped like `t0` (`w` is not zeroed on unused rows).
    """
    T = t0.shape[0]
    i = jnp.arange(T) if rows is None else rows
    g = ker.g1
    in_use = i < n
    L = jnp.sum(mask, dtype=jnp.int32) if L is None else L
    if nxt is None:
        nxt = jnp.concatenate([t0[1:], jnp.full((1,), T, t0.dtype)])
    end = jnp.where(i + 1 < n, nxt, L)
    l = jnp.where(in_use, jnp.clip(end - t0, 1, mask.shape[0]), 1)  # rows may be fewer than frames
    e = jnp.expm1(l * jnp.log(g))  # g^l - 1
    A1 = -e / (1 - g)
    w = (1 - g * g) / (-e * (2 + e))
    a_first, a_last = a[0] - (1 - g), a[jnp.maximum(L - 1, 0)] - (1 - g)
    Aa = (1 - g) * A1 + jnp.where(t0 == 0, a_first, 0) + jnp.where(end == L, a_last * (1 + e) / g, 0)
    return in_use, l, A1, Aa, w


def _pool_gram_ar1(pools, pinned, a, ker: _Kernel, mask, bound=None):
    """The six weighted sums over AR(1) pools `(t0, A_x, n)` (as `_pav` returns them) that the (b, lam) update needs.

    With the pools' sums A_x (of the data they were built on), A_1 and A_a (closed forms, `_pool_sums_ar1`) and
    weights w = 1/H2(l) (0 on unused rows and on a pinned first pool): `(w A_x A_1, w A_1^2, w A_a A_1, w A_x^2,
    w A_x A_a, w A_a^2)`, each summed. They are computed once per structure and shared by the free and the
    fixed-baseline update of a non-negative baseline (`_update_b_lam_gram`).

    `bound`: optional number of rows, shared by a vmapped batch (not batched itself), past which no lane has pools;
    the sums then run over blocks of `_GRAM_ROWS` rows up to it instead of over all rows. Inside `_nested_ar1` the
    pools are a few hundred of the elements' 5,000 rows (10,000 frames): on 512 x 10,000 traces (one core) the
    whole-row passes took about 37 of an iteration's 100 ms, and the batch 1.16 -> 1.04 s with the blocks (128 rows:
    the same, 512: 1.09 s).

    **Returns:** `(T,)`-summed scalars as a `(6,)` array.
    """
    t0, Ax, n = pools
    T = t0.shape[0]
    L = jnp.sum(mask, dtype=jnp.int32)

    def sums(rows, t0_rows, nxt_rows, Ax_rows):
        in_use, l, A1, Aa, w = _pool_sums_ar1(t0_rows, n, a, ker, mask, rows=rows, nxt=nxt_rows, L=L)
        w = jnp.where(in_use & ~(pinned & (rows == 0)), w, 0).astype(Ax.dtype)
        wA1, wAa = w * A1, w * Aa
        return jnp.stack([jnp.sum(wA1 * Ax_rows), jnp.sum(wA1 * A1), jnp.sum(wA1 * Aa), jnp.sum(w * Ax_rows * Ax_rows),
                          jnp.sum(wAa * Ax_rows), jnp.sum(wAa * Aa)])

    if bound is None or T <= _GRAM_ROWS:
        return sums(jnp.arange(T), t0, None, Ax)
    k = _GRAM_ROWS

    def block(j, acc):
        rows = j * k + jnp.arange(k)
        inside = jnp.minimum(rows, T - 1)
        nxt = jnp.where(rows + 1 < T, t0[jnp.minimum(rows + 1, T - 1)], T)
        return acc + sums(rows, t0[inside], nxt, jnp.where(rows < T, Ax[inside], 0))

    return jax.lax.fori_loop(0, (bound + k - 1) // k, block, jnp.zeros(6, Ax.dtype))


_GRAM_ROWS = 256  # rows a block of `_pool_gram_ar1` with a bound


def _update_b_lam_gram(gram, data_sums, sn, length, b, lam, b_fix, lam_fix, *, b_free: bool, lam_free: bool):
    """`_update_b_lam` for AR(1) from the pools of `_pav` alone, without applying M frame by frame.

    On a pool structure M is the orthogonal projection P onto the pools' decaying kernels (0 on a pinned first pool),
    so every sum `_update_b_lam` needs is a sum over pools of A_u A_w / H2(l): with r0 = y - P y, e = 1 - P 1 and
    ua = P a, sum(r0) = <r0, e> = sum(y) - <P y, P 1>, sum(e) = |e|^2 = L - |P 1|^2, sum(ua) = <P a, P 1>,
    |r0|^2 = |y|^2 - |P y|^2, <r0, ua> = <e, ua> = 0, and A_y = A_x + b A_1 + lam A_a from the shifted data
    x = y - b - lam a the pools were built on. The differences |y|^2 - |P y|^2 cancel: call it on data centred near
    its baseline.

    **Arguments:** as `_update_b_lam`, with `gram` = `_pool_gram_ar1` of the pools `_pav` built at (`b`, `lam`) and
    `data_sums` = (sum(y), |y|^2, |a|^2) over the valid frames instead of the frame-wise arrays.

    **Returns:** `(b, lam)`.
    """
    xA1, A1A1, aA1, xx, xa, aa = (gram[k] for k in range(6))
    Sy, yy, a_sq = data_sums
    dt = gram.dtype
    PyP1 = xA1 + b * A1A1 + lam * aA1  # <P y, P 1>, with A_y = A_x + b A_1 + lam A_a
    PyPy = xx + b * b * A1A1 + lam * lam * aa + 2 * b * xA1 + 2 * lam * xa + 2 * b * lam * aA1
    s_r0 = Sy - PyP1
    s_e = length - A1A1
    s_ua = aA1
    if b_free:
        ok = jnp.abs(s_e) > 1e-6 * length
        safe = jnp.where(ok, s_e, 1)
        b0 = jnp.where(ok, s_r0 / safe, b)
        b1 = jnp.where(ok, s_ua / safe, 0)
    else:
        b0, b1 = b_fix, jnp.zeros((), dt)
    if lam_free:
        r0r0 = yy - PyPy
        qa = aa + b1**2 * s_e
        qb = -b1 * s_r0 + b0 * b1 * s_e
        qc = r0r0 - 2 * b0 * s_r0 + b0**2 * s_e - sn**2 * length
        lam_new = _lam_root(qa, qb, qc, lam, a_sq)
    else:
        lam_new = lam_fix
    return b0 + b1 * lam_new, lam_new


def _data_sums(y, a, mask):
    """(sum(y), |y|^2, |a|^2) over the valid frames: the data's part of `_update_b_lam_gram` (fixed in a search)."""
    ym = jnp.where(mask, y, 0)
    return jnp.sum(ym), jnp.sum(ym * ym), jnp.sum(a * a)


# ----------------------------------------------------------------------------------------------------------------------
# AR(1): nested pool structures (the fast exact search for the noise-constrained problem)
# ----------------------------------------------------------------------------------------------------------------------

LANE_AXIS = "deconv_lanes"  # vmap axis name under which the batch shares loop bounds (`deconvolve_batch` binds it)


def _lanes_bound() -> bool:
    """Whether we are traced under a vmap that binds `LANE_AXIS` (so a bound can be shared by the whole batch)."""
    try:
        jax.lax.pmax(jnp.int32(0), LANE_AXIS)
    except NameError:
        return False
    return True


def _nested_ar1(y_s, a_s, mask, length, ker: _Kernel, sn, b0, lam0, lam_fix, floor, *, b_free, lam_free: bool,
                max_iter: int, first=None, cut: bool = False):
    """AR(1): the noise-constrained solution's structure, searched by merging the pools of the structure at (b0, lam0).

    In the coordinates u_t = c_t / g^t the AR(1) problem at fixed (b, lam) is a weighted isotonic regression of
    z_t = (y_t - b - lam a_t) / g^t, and raising b or lam subtracts a non-decreasing sequence from z (1/g^t and
    a_t/g^t are non-decreasing). Subtracting a non-decreasing sequence keeps every block of the isotonic solution
    unsplittable (a block's prefix means stay above its mean), so the structure at any (b, lam) >= (b0, lam0) is
    obtained EXACTLY by pool-adjacent-violators run over the pools at (b0, lam0) as elements. One pass over the
    frames builds those pools; each (b, lam) iteration then costs a pass over the pools only (usually a few hundred),
    with all lanes of a batch sharing the number of steps (`LANE_AXIS`).

    **Arguments:**
    - `y_s`, `a_s`, `mask`, `length`: centred data, penalty weights, valid frames and their number.
    - `ker`: AR(1) kernel; `sn`: noise level; `b0`, `lam0`: where the elements are built (a lower bound of the
      answer for the result to be exact); `lam_fix`: lam when it is not estimated; `floor`: the lowest b allowed.
    - `b_free`, `lam_free`, `max_iter`: as in `_solve`.
    - `first`: optional `(b, lam, use)`: where lanes with `use` evaluate their first structure (a guess of the answer
      at or above (b0, lam0), e.g. the prefix's answer); other lanes start from the (b, lam) update on the pools at
      (b0, lam0). From the frames' fine pools that update overshoots b (the fit follows the noise) and costs one or two
      extra passes over the elements.
    - `cut`: iterate on fewer rows of elements where they fit (`_ELEMENT_ROWS`).

    **Returns:** `(structure, b, lam, safe)`: the pool starts and pinned flag found at the last (b, lam) evaluated,
    the (b, lam) update on it, and whether that evaluation point was >= (b0, lam0) (then the structure is exact).
    """
    T = y_s.shape[0]
    dt = y_s.dtype
    zero = jnp.zeros((), dt)
    length_f = length.astype(dt)
    _, pinned0, (e_t0, e_A0, n0) = _pav(jnp.where(mask, y_s - b0 - lam0 * a_s, 0), ker, length, 0.0)
    _, _, A1, Aa, _ = _pool_sums_ar1(e_t0, n0, a_s, ker, mask)
    n_max = jax.lax.pmax(n0, LANE_AXIS)
    sums = _data_sums(y_s, a_s, mask)

    def update(pools, pinned, b, lam):
        bound = jax.lax.pmax(pools[2], LANE_AXIS)
        head = (_pool_gram_ar1(pools, pinned, a_s, ker, mask, bound), sums, sn, length_f)
        return _b_lam(_update_b_lam_gram, head, b, lam, zero, lam_fix, b_free=b_free, lam_free=lam_free,
                      floor=floor)

    def search(rows):
        """The iterations on the elements' first `rows` rows (every lane's elements fit in them)."""
        e_t0r, e_A0r, A1r, Aar = (v[:rows] for v in (e_t0, e_A0, A1, Aa))
        i = jnp.arange(rows)

        def body(state):
            b, lam, t0_prev, pinned_prev, _, it, _, _, _ = state
            eA = jnp.where(i < n0, e_A0r - (b - b0) * A1r - (lam - lam0) * Aar, 0)
            _, pinned, pools = _pav(eA, ker, length, 0.0, elem_t0=e_t0r, n_elem=n0, steps=2 * n_max)
            same = jnp.all(pools[0] == t0_prev) & (pinned == pinned_prev)
            b_new, lam_new = update(pools, pinned, b, lam)
            fixed = _b_lam_settled(b_new, b, lam_new, lam, jnp.abs(b) + sn)
            return b_new, lam_new, pools[0], pinned, pools[2], it + 1, same | fixed, b, lam

        def cond(state):
            return ~state[6] & (state[5] < max_iter)

        b1, lam1 = update((e_t0r, e_A0r, n0), pinned0, b0, lam0)
        if first is not None:
            b1, lam1 = jnp.where(first[2], first[0], b1), jnp.where(first[2], first[1], lam1)
        init = (b1, lam1, e_t0r, pinned0, n0, jnp.int32(0), jnp.bool_(False), b0, lam0)
        b, lam, t0, pinned, n, _, _, b_at, lam_at = jax.lax.while_loop(cond, body, init)
        starts = jnp.zeros(T, bool).at[jnp.where(i < n, t0, T)].set(True, mode="drop")
        return (starts, pinned), b, lam, (b_at >= b0) & (lam_at >= lam0)

    # With `cut`, the iterations run on the elements' first T // k rows (k in `_ELEMENT_ROWS`) when the whole batch's
    # elements fit: the pools' (T,) arrays are mostly unused rows (n0 is about T / 4 on sparse traces) and each
    # iteration's passes over them (the (b, lam) update, the comparison) cost about as much as the merging.
    if not cut:
        return search(T)
    rows = sorted({max(T // k, 1) for k in _ELEMENT_ROWS} | {T})
    branch = sum((n_max > r).astype(jnp.int32) for r in rows[:-1])
    return jax.lax.switch(branch, [functools.partial(search, r) for r in rows])


_ELEMENT_ROWS = (2,)
"""Row cuts of `_nested_ar1`'s elements (T // k rows), one compiled branch each. 512 x 10,000 AR(1) traces on one
core: 1.62 s with none, 1.39 s with (2,) (n0 <= 0.27 T there), 1.33 s with (4, 2); each branch adds about 1.7 s to
the first compilation (5.8 s with none), so only the half is kept. Only the full-length search (`cut=True`, traces
of at least 4 `_PREFIX` frames) uses them."""


def _prefix_problem(y_s, mask, length, g, c1_free: bool, n: int | None = None):
    """The first `n` (default `_PREFIX`) frames of a long trace as a problem of their own: `(y, a, mask, length)`."""
    n = _PREFIX if n is None else n
    n0 = jnp.minimum(length, n)
    m0 = mask[:n] & (jnp.arange(n) < n0)
    a0 = _penalty_weights(g, n, n0, c1_free)
    return jnp.where(m0, y_s[:n], 0), a0, m0, n0


def _exact_prefix_length(T: int) -> int:
    """Frames of the exact AR(2) search's prefix start: `_PREFIX`, or a quarter of a shorter trace (0: none)."""
    n = min(_PREFIX, T // _PREFIX_FRACTION)
    return n if n >= _PREFIX_MIN else 0


# first start of `_search_nested_ar1` below the prefix's answer: b - 2 sn and lam / 4. With b - sn and lam / 2, 7 of
# 2,000 simulated 10,000-frame traces started above their answer, and each took its whole 500-row block through a
# second round (AR(1), 2 threads: 135-155 -> 223-231 traces/s)
_MARGIN = (2.0, 0.25)
_ROUNDS = 3  # starting points tried by `_search_nested_ar1` before it falls back to frame-level alternation


def _search_nested_ar1(y_s, a_s, mask, length, ker: _Kernel, sn, b_start, lam_init, lam_fix, long, alternate, *,
                       b_free, lam_free: bool, c1_free: bool, max_iter: int):
    """AR(1) structure of the noise-constrained solution by `_nested_ar1`, from a starting point below the answer.

    The start (b0, lam0) comes from the first `_PREFIX` frames on long traces (their own nested search from the
    lowest point) lowered by a margin (`_MARGIN`: lam / 4 and b - 2 sn). A lane whose answer ends below its start is
    searched again from a lower point (lam0 / 16 and b0 - 8 sn, then lam0 = 0 and the floor), and after `_ROUNDS` by
    the frame-level alternation, which certifies its answer as a fixed point; under vmap a round costs the batch one
    pass over the frames only when some lane needs it.

    **Arguments:** as `_nested_ar1` (`b_start`: the baseline guess the data were centred on; `lam_init`: the first
    lam), plus `long` (use the prefix), `alternate` (the frame-level search of `_solve`) and the static options.

    **Returns:** `(structure, b, lam)`: the structure `(starts, pinned)` and the (b, lam) update on it (b relative to
    `b_start`), i.e. the solution's baseline and lam.
    """
    T = y_s.shape[0]
    dt = y_s.dtype
    zero = jnp.zeros((), dt)
    floor = -b_start  # b = 0 in absolute terms (b is relative to b_start)
    nonneg = b_free == "nonneg"
    clamp = (lambda b: jnp.maximum(b, floor)) if nonneg else (lambda b: b)
    search = lambda y, a, m, n, b0, lam0, first=None, cut=False: _nested_ar1(
        y, a, m, n, ker, sn, b0, lam0, lam_fix, floor, b_free=b_free, lam_free=lam_free, max_iter=max_iter,
        first=first, cut=cut)
    b_pre, lam_pre = clamp(zero), lam_init
    if long:
        prefix = _prefix_problem(y_s, mask, length, jnp.reshape(ker.g1, (1,)), c1_free)
        _, b_pre, lam_pre, _ = search(*prefix, b_pre, lam_init)

    def lowered(b0, lam0, k):
        """Start of round k (0, 1, ...): b0 - m_b 4^k sn and lam0 m_lam / 4^k (`_MARGIN`), the last from lam = 0 and
        the floor."""
        last = k >= _ROUNDS - 1
        b = clamp(b0 - _MARGIN[0] * sn * 4.0**k) if b_free else zero
        if nonneg:
            b = jnp.where(last, floor, b)
        lam = jnp.where(last, 0, lam0 * _MARGIN[1] / 4.0**k) if lam_free else lam_fix
        return b, lam

    def body(state):
        k, b_lo, lam_lo, _, _, _, _ = state
        b0, lam0 = lowered(b_lo, lam_lo, k)
        # the first round evaluates its first structure at the prefix's answer (above its start by the margin)
        first = (clamp(b_pre) if b_free else zero, lam_pre if lam_free else lam_fix, jnp.bool_(long) & (k == 0))
        structure, b, lam, safe = search(y_s, a_s, mask, length, b0, lam0, first, cut=long)
        return k + 1, jnp.minimum(b0, b), jnp.minimum(lam0, lam), structure, b, lam, safe

    def cond(state):
        return ~state[-1] & (state[0] < _ROUNDS)

    none = (jnp.zeros(T, bool), jnp.bool_(False))
    init = (jnp.int32(0), b_pre, lam_pre * 1.0, none, zero, zero, jnp.bool_(False))
    _, _, _, structure, b, lam, safe = jax.lax.while_loop(cond, body, init)
    b, lam, structure = alternate(y_s, a_s, mask, length, b, lam, structure, skip=safe)
    return structure, b, lam


# ----------------------------------------------------------------------------------------------------------------------
# The whole solve for one trace
# ----------------------------------------------------------------------------------------------------------------------


def _initial_baseline(y, mask, length):
    """A cheap first guess of the baseline: the mean of the minima of 32-frame blocks (no sort: XLA's is slow on CPU).

    Only the number of outer iterations depends on it; the baseline itself is solved for exactly.
    """
    T = y.shape[0]
    n = -(-T // 32) * 32
    blocks = jnp.pad(jnp.where(mask, y, jnp.inf), (0, n - T), constant_values=jnp.inf).reshape(-1, 32)
    mins = jnp.min(blocks, axis=1)
    ok = jnp.isfinite(mins)
    return jnp.sum(jnp.where(ok, mins, 0)) / jnp.maximum(jnp.sum(ok), 1)


def _solve(y, g, sn, b_fix, c1_fix, lam_fix, s_min, length, *, b_free, c1_free, lam_free, max_iter, exact2,
           convex=True):
    """Deconvolve one trace: search the spike support, then evaluate the (differentiable) solution on it.

    **Arguments:**
    - `y`: `(T,)` trace; `g`: `(p,)`; `sn`, `b_fix`, `c1_fix`, `lam_fix`, `s_min`: scalars; `length`: valid frames.
    - `b_free`, `c1_free`, `lam_free`: which quantities are estimated (static); `max_iter`: bound on outer iterations.
    - `exact2`: AR(2) solved exactly (dual active set on the banded system, warm-started from greedy pool merging);
      otherwise pool merging alone (exact for AR(1); the greedy rule for AR(2) with s_min > 0).
    - `convex`: s_min is 0 (static), which lets AR(1) search over nested pool structures (`_search_nested_ar1`).

    **Returns:** a `DeconvResult`.
    """
    structure, b_guess, _ = _search(y, g, sn, b_fix, c1_fix, lam_fix, s_min, length, b_free=b_free, c1_free=c1_free,
                                    lam_free=lam_free, max_iter=max_iter, exact2=exact2, convex=convex)
    return _evaluate(y, g, sn, b_fix, c1_fix, lam_fix, length, structure, b_guess, b_free=b_free, c1_free=c1_free,
                     lam_free=lam_free, exact2=exact2)


def _search(y, g, sn, b_fix, c1_fix, lam_fix, s_min, length, *, b_free, c1_free, lam_free, max_iter, exact2,
            convex=True, start_only=False):
    """The non-differentiable half of `_solve` (same arguments): the solution's structure, found behind
    stop_gradient.

    `start_only` (exact AR(2) only): return the `_ExactStart` of the active-set alternation instead of running it
    (`_batch_core` runs it for the whole batch at once, in time-major layout).

    **Returns:** `(structure, b_guess, settled)`: the pool starts (AR(1), greedy AR(2)) or spike support (exact
    AR(2)) `(T,)` with the pinned flag, the baseline the search centred the data on (kept where b is undetermined),
    and, from the nested AR(1) search (else None), the solution's `(b, lam)` as the search's last update computed
    them from the pools' sums (`_evaluate_ar1` can use them where no gradient is needed).
    """
    T = y.shape[0]
    dt = y.dtype
    t = jnp.arange(T)
    mask = t < length
    length_f = length.astype(dt)

    def prepare(y, g):
        ker = _kernel(g, T)
        a = _penalty_weights(g, T, length, c1_free)
        d = ker.hh[2 : T + 2]
        y = jnp.where(mask, y - (0 if c1_free else c1_fix * d), 0)
        return ker, a, y, d

    # --- the search, behind stop_gradient, on data centred at the first baseline guess (b is relative to it) ---
    g = jax.lax.stop_gradient(g)
    ker_s, a_s, y_s, _ = prepare(jax.lax.stop_gradient(y), g)
    sn_s = jax.lax.stop_gradient(sn)
    lam0 = jnp.zeros((), dt) if lam_free else lam_fix
    b_start = _initial_baseline(y_s, mask, length) if b_free else b_fix
    y_s = jnp.where(mask, y_s - b_start, 0)
    first = (jnp.zeros(T, bool), jnp.bool_(False))
    zero = jnp.zeros((), dt)
    by_pools = ker_s.ar1 and not exact2  # AR(1): (b, lam) from the pools' sums, no frame-by-frame projection

    def alternate(y_s, a_s, mask, length, b, lam, first, iters=max_iter, skip=None):
        """Alternate the pool-merging search with the closed-form (b, lam) update until the structure is a fixed
        point (exact AR(2) alternates with the active-set search instead: `_alternate_exact`).

        `skip`: lanes already solved (they return `b`, `lam`, `first` as given)."""
        length_f = length.astype(dt)
        rhs_fixed = jnp.stack([y_s, mask.astype(dt), a_s], axis=1)

        def search(b, lam, prev):
            starts, pinned, pools = _pav(jnp.where(mask, y_s - b - lam * a_s, 0), ker_s, length, s_min)
            return (starts, pinned), pools

        def outer_body(state):
            b, lam, prev, it, _ = state
            structure, pools = search(b, lam, prev)
            same = jnp.all(structure[0] == prev[0]) & (structure[1] == prev[1]) & (it > 0)
            if by_pools:
                gram = _pool_gram_ar1(pools, structure[1], a_s, ker_s, mask)
                update, head = _update_b_lam_gram, (gram, _data_sums(y_s, a_s, mask), sn_s, length_f)
            else:
                Mx = _on_pools(rhs_fixed, structure[0], structure[1], ker_s, length)
                update, head = _update_b_lam, (y_s, a_s, (Mx[:, 0], Mx[:, 1], Mx[:, 2]), mask, sn_s, length_f)
            b_new, lam_new = _b_lam(
                update, head, b, lam, zero, lam_fix, b_free=b_free, lam_free=lam_free, floor=-b_start
            )
            fixed = _b_lam_settled(b_new, b, lam_new, lam, jnp.abs(b + b_start) + sn_s)
            return b_new, lam_new, structure, it + 1, same | (fixed & (it > 0))

        def outer_cond(state):
            return ~state[-1] & (state[3] < iters)

        if not (b_free or lam_free):
            return b, lam, search(b, lam, first)[0]
        init = (b, lam, first, jnp.int32(0), jnp.bool_(False) if skip is None else skip)
        b, lam, structure, _, _ = jax.lax.while_loop(outer_cond, outer_body, init)
        return b, lam, structure

    b_pre, lam_pre = zero, lam0
    n_pre = _exact_prefix_length(T) if exact2 else _PREFIX
    long = lam_free and (n_pre > 0 if exact2 else T >= 4 * _PREFIX and by_pools)
    nested = by_pools and convex and (b_free or lam_free) and _lanes_bound()
    settled = None
    if nested:
        structure, b, lam = _search_nested_ar1(y_s, a_s, mask, length, ker_s, sn_s, b_start, lam0, lam_fix, long,
                                               alternate, b_free=b_free, lam_free=lam_free, c1_free=c1_free,
                                               max_iter=max_iter)
        settled = (b + b_start, lam)
    elif long:
        # Long traces: (b, lam) from the first _PREFIX frames first (lam is a per-spike threshold and the noise budget
        # a per-frame one, so they carry over), which leaves the full-length search a pass or two from the end.
        # Exact AR(2) from 2 _PREFIX frames on: 16 x 3,000 traces took 51 active-set steps in 7 alternations from
        # (0, 0), 19 in 4 from the prefix's (b, lam) (one core: 0.117 -> 0.083 s in all).
        prefix = _prefix_problem(y_s, mask, length, g, c1_free, n_pre)
        b_pre, lam_pre, _ = alternate(*prefix, zero, lam0, (first[0][:n_pre], first[1]),
                                      iters=min(max_iter, _PREFIX_ITERS))
        b_pre = b_pre if b_free else zero
    if exact2:
        # AR(2): the active-set search starts from one greedy pool-merging pass at the first (b, lam) (the prefix's
        # on long traces). Converging (b, lam) with greedy merging first (3 alternations) saved no active-set steps
        # and cost 1.5x in all (320 x 10,000 frames, 64-row blocks: 13.3 vs 8.9 s on one core).
        starts, pinned, _ = _pav(jnp.where(mask, y_s - b_pre - lam_pre * a_s, 0), ker_s, length, s_min)
        start = _ExactStart(y_s=y_s, a_s=a_s, q_s=jnp.where(mask & ~((t == 0) & c1_free), 1, 0).astype(dt),
                            b=b_pre, lam=lam_pre, active=starts & ~((t == 0) & pinned), b_start=b_start)
        if start_only:
            return start
        active = _alternate_exact(start, g[0], g[1], sn_s, lam_fix, length, b_free=b_free, lam_free=lam_free,
                                  max_iter=max_iter)
        structure = (active, jnp.bool_(False))
    elif not nested:
        _, _, structure = alternate(y_s, a_s, mask, length, b_pre, lam_pre, first)
    return jax.lax.stop_gradient((structure, b_start, settled))


def _evaluate(y, g, sn, b_fix, c1_fix, lam_fix, length, structure, b_guess, *, b_free, c1_free, lam_free, exact2):
    """The differentiable half of `_solve`: the solution on the `structure` `_search` found, in closed form (a
    projection and the (b, lam) update), differentiable in y, g and sn.

    **Returns:** a `DeconvResult`.
    """
    dt = y.dtype
    if g.shape[0] == 1 and not exact2:
        col = lambda v: jnp.reshape(jnp.asarray(v, dt), (1,))
        out = _evaluate_ar1(y[:, None], col(g[0]), col(sn), col(b_fix), col(c1_fix), col(lam_fix),
                            jnp.reshape(length, (1,)), structure[0][:, None], jnp.reshape(structure[1], (1,)),
                            col(b_guess), b_free=b_free, c1_free=c1_free, lam_free=lam_free)
        return DeconvResult(c=out.c[:, 0], s=out.s[:, 0], b=out.b[0], c1=out.c1[0], g=g, sn=out.sn[0], lam=out.lam[0])
    return _evaluate_ar2(y, g, sn, b_fix, c1_fix, lam_fix, length, structure, b_guess, b_free=b_free,
                         c1_free=c1_free, lam_free=lam_free, exact=exact2)


def _evaluate_ar2(y, g, sn, b_fix, c1_fix, lam_fix, length, structure, b_guess, *, b_free, c1_free, lam_free, exact):
    """`_evaluate` for AR(2): c = M (y - b - lam a) with M the projection of the structure, (b, lam) in closed form;
    differentiable in y, g and sn.

    `exact`: the structure is an exact spike support, M its banded projection; one trace (`y` `(T,)`, `g` `(2,)`,
    scalars) or N traces in time-major layout (`y` and the support `(T, N)`, `g` `(2, N)`, `(N,)` the rest). 64 x
    10,000 traces on one core: about 0.04 s time-major against 0.07-0.11 s vmapped over (N, T) traces. Otherwise
    the structure is greedy pools `(starts, pinned)` of one trace, M their pool map (`_on_pools`).

    **Returns:** a `DeconvResult` (`c`, `s` shaped like `y`; `g` as given).
    """
    T = y.shape[0]
    dt = y.dtype
    mask = _trailing(jnp.arange(T), y.ndim) < length
    zero = jnp.zeros_like(jnp.asarray(sn, dt))
    g1, g2 = g[0], g[1]
    a = _penalty_weights(g, T, length, c1_free)
    if c1_free:
        y_d = jnp.where(mask, y, 0)
    else:  # the decay of c1: the impulse response h_t, per lane
        d = _impulse(g, T)
        y_d = jnp.where(mask, y - c1_fix * d, 0)
    rhs = jnp.stack([y_d, mask.astype(dt), a], axis=-1)
    if exact:
        Mx = _project(g1, g2, rhs, structure[0], mask)
    else:
        Mx = _on_pools(rhs, structure[0], structure[1], _kernel(g, T), length)
    Mx = (Mx[..., 0], Mx[..., 1], Mx[..., 2])
    lam0 = zero if lam_free else lam_fix
    b, lam = _b_lam(functools.partial(_update_b_lam, axis=0), (y_d, a, Mx, mask, sn, jnp.asarray(length).astype(dt)),
                    b_guess, lam0, b_fix, lam_fix, b_free=b_free, lam_free=lam_free, floor=zero)
    c = Mx[0] - b * Mx[1] - lam * Mx[2]
    c_prev1 = jnp.concatenate([jnp.zeros_like(c[:1]), c[:-1]])
    c_prev2 = jnp.concatenate([jnp.zeros_like(c[:2]), c[:-2]])
    s = jnp.where(structure[0], c - g1 * c_prev1 - g2 * c_prev2, 0)
    if c1_free:
        c1 = c[0]
        s = s.at[0].set(0)
    else:
        c1 = jnp.broadcast_to(jnp.asarray(c1_fix, dt), c.shape[1:])
        c = jnp.where(mask, c + c1 * d, 0)
    return DeconvResult(c=c, s=s, b=jnp.asarray(b, dt), c1=c1, g=g, sn=jnp.asarray(sn, dt), lam=jnp.asarray(lam, dt))


def _evaluate_ar1(Y, g, sn, b_fix, c1_fix, lam_fix, length, starts, pinned, b_guess, *, b_free, c1_free, lam_free,
                  settled=None):
    """`_evaluate` for AR(1) pool structures of N traces at once, in time-major layout ((T, N) arrays).

    M u for u = (y, 1, a) by `_pool_projection_ar1`, then the closed-form (b, lam) update and c = M (y - b - lam a).
    512 x 10,000 traces on one core: 0.27 s with the transposes, against 0.61 s for the per-trace evaluation vmapped
    over lane-major (N, T) traces.

    **Arguments:**
    - `Y`: `(T, N)` traces; `g`: `(N,)` AR(1) coefficients; `sn`, `b_fix`, `c1_fix`, `lam_fix`, `length`, `pinned`,
      `b_guess`: `(N,)` (as in `_solve`; `b_guess` is kept where b is undetermined).
    - `starts`: `(T, N)` pool starts (from `_search`, no gradient).
    - `b_free`, `c1_free`, `lam_free`: as in `_solve`.
    - `settled`: optional `(b, lam)` `(N,)` of the solution (from `_search`'s nested AR(1) search, no gradient): then
      only `y - b - lam a` is projected, not y, 1 and a for the (b, lam) update (512 x 10,000 traces on one core:
      0.27 -> 0.11 s).

    **Returns:** a `DeconvResult` with `c` and `s` `(T, N)`, `g` `(N, 1)` and the rest `(N,)`.
    """
    T, N = Y.shape
    dt = Y.dtype
    t = jnp.arange(T)[:, None]
    L = length[None, :]
    mask = t < L
    g_row = g[None, :]
    lg = jnp.log(g_row)
    d = jnp.exp(t * lg)  # g^t, the decay of c1
    a = 1 - g_row * (t + 1 < L) - ((t == 0) if c1_free else 0)
    a = jnp.where(mask, a, 0).astype(dt)
    y = jnp.where(mask, Y - (0 if c1_free else c1_fix[None, :] * d), 0)
    zeros = jnp.zeros(N, dt)
    if settled is None:
        Mx = _pool_projection_ar1((y, mask.astype(dt), a), starts, pinned, g, length)
        lam0 = zeros if lam_free else lam_fix
        update = functools.partial(_update_b_lam, axis=0)
        b, lam = _b_lam(update, (y, a, Mx, mask, sn, length.astype(dt)), b_guess, lam0, b_fix, lam_fix,
                        b_free=b_free, lam_free=lam_free, floor=zeros)
        c = Mx[0] - b * Mx[1] - lam * Mx[2]
    else:
        b, lam = settled
        (c,) = _pool_projection_ar1((jnp.where(mask, y - b - lam * a, 0),), starts, pinned, g, length)
    c_prev = jnp.concatenate([jnp.zeros((1, N), dt), c[:-1]])
    s = jnp.where(starts, c - g_row * c_prev, 0)
    if c1_free:
        c1 = c[0]
        s = s.at[0].set(0)
    else:
        c1 = c1_fix
        c = jnp.where(mask, c + c1[None, :] * d, 0)
    return DeconvResult(c=c, s=s, b=b, c1=c1, g=g[:, None], sn=sn, lam=lam)


# ----------------------------------------------------------------------------------------------------------------------
# Refining the kinetics on a first solution's spike support
# ----------------------------------------------------------------------------------------------------------------------

_GOLDEN = float((np.sqrt(5) - 1) / 2)
REFINE_STEPS = 14
"""Golden-section steps of `_refine_g` (the bracket of log decay time shrinks by 0.618 per step: 14 steps leave
0.1 % of its width, 0.3 % of the decay time)."""
REFINE_RANGE = (0.25, 2.0)
"""Decay times `_refine_g` searches, as factors of the starting one (the autocovariance's is usually too slow)."""


def _impulse(g, T: int):
    """The impulse response h_0..h_(T-1) of the AR kernel `g`: `(p,)` -> `(T,)`, or `(p, N)` -> `(T, N)` per lane."""
    h = lambda gk: _kernel(gk, T).hh[2 : T + 2]  # noqa: E731
    return h(g) if g.ndim == 1 else jax.vmap(h, in_axes=1, out_axes=1)(g)


def _support_rss(y, g, support, b, c1_fix, lam, length, *, c1_free: bool):
    """Residual energy ||y - b - c1 d - c||^2 of the least-squares calcium c whose spikes lie on `support`, for the
    kernel `g`, the baseline `b` and the shift `lam` held fixed (one projection: pools for AR(1), a banded solve for
    AR(2)); spikes on the support may take either sign.

    **Arguments:**
    - `y`: `(T,)` trace (zero at padded frames); `g`: `(p,)`; `support`: `(T,)` bool, frames that may hold a spike.
    - `b`, `c1_fix`, `lam`: scalars (`c1_fix` is used when c1 is not free); `length`: valid frames; `c1_free`: static.
    - Or N traces in time-major layout: `y`, `support` `(T, N)`, `g` `(p, N)`, `(N,)` the scalars.

    **Returns:** a scalar (`(N,)`).
    """
    T = y.shape[0]
    t = _trailing(jnp.arange(T), y.ndim)
    mask = t < length
    a = _penalty_weights(g, T, length, c1_free)
    x = jnp.where(mask, y - b - (0 if c1_free else c1_fix * _impulse(g, T)), 0)
    shifted = jnp.where(mask, x - lam * a, 0)
    if g.shape[0] == 1:  # every pool starts at a spike or at frame 0; the first is pinned at 0 when c1 is not free
        lanes = lambda v: jnp.reshape(v, (T, -1))  # noqa: E731
        flat = lambda v: jnp.reshape(v, (-1,))  # noqa: E731
        pinned = jnp.full(flat(g[0]).shape, not c1_free)
        c = _pool_projection_ar1((lanes(shifted),), lanes(support | (t == 0)), pinned, flat(g[0]),
                                 flat(jnp.broadcast_to(length, flat(g[0]).shape)))[0].reshape(y.shape)
    else:
        c = _project(g[0], g[1], shifted, (support | (t == 0)) if c1_free else (support & (t > 0)), mask)
    r = jnp.where(mask, x - c, 0)
    return jnp.sum(r * r, axis=0)


def _golden(f, lo, hi, steps: int):
    """Golden-section search for a minimum of the scalar function `f` on [lo, hi], `steps` evaluations after the
    first two (a fixed count: vmaps, and every lane does the same work). Returns the better of the last two points."""
    x1 = hi - _GOLDEN * (hi - lo)
    x2 = lo + _GOLDEN * (hi - lo)

    def body(_, state):
        lo, hi, x1, x2, f1, f2 = state
        left = f1 < f2  # the minimum lies in [lo, x2]
        lo, hi = jnp.where(left, lo, x1), jnp.where(left, x2, hi)
        new = jnp.where(left, hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo))
        f_new = f(new)
        x1, x2 = jnp.where(left, new, x2), jnp.where(left, x1, new)
        f1, f2 = jnp.where(left, f_new, f2), jnp.where(left, f1, f_new)
        return lo, hi, x1, x2, f1, f2

    _, _, x1, x2, f1, f2 = jax.lax.fori_loop(0, steps, body, (lo, hi, x1, x2, f(x1), f(x2)))
    return jnp.where(f1 < f2, x1, x2)


def _refine_g(y, g, s, b, c1, lam, length, *, c1_free: bool, steps: int = REFINE_STEPS):
    """AR coefficients refitted to a first solution: with its spike support, baseline and lam held fixed, the decay
    time minimising `_support_rss` (golden section over log decay time in `REFINE_RANGE` times the starting one).

    The autocovariance fit (`noise.estimate_ar`) sees the transients only through a few lags and mixes in slow drift;
    the support says where the calcium decays freely, and the residual there measures the decay directly (OASIS's
    `optimize_g` does the same with a bounded scalar search). For AR(2) the rise root is kept and only the decay root
    moves. Not differentiated (the result is behind `stop_gradient`).

    **Arguments:**
    - `y`: `(T,)` trace; `g`: `(p,)` starting coefficients; `s`, `b`, `c1`, `lam`: the first solution's.
    - `length`: valid frames; `c1_free`: whether c1 was estimated (static); `steps`: golden-section steps.
    - Or N traces in time-major layout: `y`, `s` `(T, N)`, `g` `(N, p)`, `(N,)` the scalars (`_refine_core`). The
      golden sections of all lanes run together (their step count is fixed), every step one projection of the whole
      batch: 512 x 10,000 AR(1) traces on one core 3.3 s vmapped over (N, T) traces, 1.0 s time-major (64 x 10,000
      AR(2): 0.27 vs 0.13 s).

    **Returns:** `(p,)` (`(N, p)`) coefficients of a stable, decaying, non-oscillating kernel.
    """
    y, g, s, b, c1, lam = (jax.lax.stop_gradient(v) for v in (y, g, s, b, c1, lam))
    dt = g.dtype
    p = g.shape[-1]
    support = s > 0
    roots = ar_roots(g)
    decay, rise = roots[..., 0], (roots[..., 1] if p == 2 else None)
    log_tau = jnp.log(-1 / jnp.log(decay))  # decay time in frames
    lo, hi = log_tau + np.log(REFINE_RANGE[0]), log_tau + np.log(REFINE_RANGE[1])
    if p == 2:  # the decay stays the slower root
        lo = jnp.maximum(lo, jnp.log(-1 / jnp.log(jnp.maximum(rise, 1e-6))) + 1e-3)

    def coefficients(lt):
        d = jnp.exp(-1 / jnp.exp(lt))
        return _roots_to_ar(jnp.stack([d, rise], axis=-1) if p == 2 else d[..., None])

    lt = _golden(lambda lt: _support_rss(y, jnp.moveaxis(coefficients(lt), -1, 0), support, b, c1, lam, length,
                                         c1_free=c1_free), lo, hi, steps)
    return coefficients(lt).astype(dt)


@eqx.filter_jit
def _refine_core(Y, g, S, b, c1, lam, length, c1_free):
    _TRACE_COUNT["refine"] += 1
    return _refine_g(Y.T, g, S.T, b, c1, lam, length, c1_free=c1_free)


@jax.jit
def _pilot_decay(g2, g1, g1_refined):
    """AR(2) kernels whose decay root is replaced by a refined AR(1) pilot's where the AR(2) fit's decay is slower
    than the AR(1) fit's (the rule `deconvolve_batch` applies to estimated AR(2) kernels, see `_estimate`).

    The AR(2) Yule-Walker fit sees p + 5 lags: when the decay time is many times that window (slow indicators, fast
    frame rates) or slow drift flattens the autocovariance, its decay root is an extrapolation and comes out slower
    than the AR(1) fit over as many lags as the decay time (`lags="auto"`), the one over the longer window. Only then is
    the decay root taken from the AR(1) kernel refitted on its first solution (`_refine_g`); the rise root is kept
    (lowered to the decay root if it would exceed it). Kernels whose short-window decay is not slower are returned
    unchanged. Elementwise over the leading axes; no branching on values.

    **Arguments:**
    - `g2`: `(..., 2)` AR(2) coefficients; `g1`: `(..., 1)` the AR(1) estimate; `g1_refined`: `(..., 1)` its refit.

    **Returns:** `(..., 2)` coefficients of a stable, decaying, non-oscillating kernel.
    """
    roots = ar_roots(g2)
    use = roots[..., 0] > g1[..., 0]  # a larger root is a slower decay
    decay = jnp.where(use, g1_refined[..., 0], roots[..., 0])
    rise = jnp.minimum(roots[..., 1], decay)
    return _roots_to_ar(jnp.stack([decay, rise], axis=-1)).astype(g2.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------------

# cap on the prefix's greedy (b, lam) alternations: AR(2) greedy merging can cycle, and a batch waits for its slowest
# lane (256 x 10,000 AR(2), one thread, vmapped active set: 30 -> 27.7, 8 -> 40.6, 4 -> 38.7, 2 -> 28.4 traces/s);
# only the start depends on it. With the time-major active set 4 is as good as 8 (64 x 10,000 traces: 32 active-set
# steps either way; 16 x 3,000: 19 vs 18) and the prefix solve takes 0.16 instead of 0.20 s (one core).
_PREFIX_ITERS = 4
_PREFIX = 1024  # frames of the warm-start solve for long traces (T >= 4 _PREFIX; exact AR(2): `_exact_prefix_length`)
_PREFIX_FRACTION = 4
_PREFIX_MIN = 256

_TRACE_COUNT = {"batch": 0, "refine": 0}  # how many times the batched cores were traced (compile-once test)


def _mode(value, name: str, nonneg: bool = False) -> tuple[bool | str, float]:
    """(estimated?, fixed value) from a `True` / number argument; `False` or None means fixed at 0. With `nonneg`,
    the string "nonneg" (estimated, kept >= 0) is accepted too and returned as the first item."""
    if value is True:
        return True, 0.0
    if nonneg and isinstance(value, str) and value == "nonneg":
        return "nonneg", 0.0
    if value is False or value is None:
        return False, 0.0
    try:
        return False, float(value)
    except (TypeError, ValueError):
        extra = ', "nonneg" (estimate it, >= 0)' if nonneg else ""
        raise ParameterError(f"{name}={value!r}: expected True (estimate it){extra} or a number (fix it).") from None


def _check_static(p, s_min, lam, max_iter):
    if p not in (1, 2):
        raise ParameterError(f"p={p!r}: only AR(1) and AR(2) kernels are supported (p=1 or p=2).")
    if not np.isscalar(s_min) or not np.isfinite(s_min) or s_min < 0:
        raise ParameterError(f"s_min={s_min!r}: expected a finite number >= 0 (0 for the convex problem).")
    if lam is not None and (not np.isscalar(lam) or not np.isfinite(lam) or lam < 0):
        raise ParameterError(f"lam={lam!r}: expected None (meet the noise constraint) or a number >= 0.")
    if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ParameterError(f"max_iter={max_iter!r}: expected a positive integer.")


def _check_g(g: np.ndarray, name: str) -> None:
    """Reject AR coefficients whose kernel is not stable, decaying and non-oscillating."""
    g = np.atleast_2d(g)
    g1 = g[:, 0]
    g2 = g[:, 1] if g.shape[1] == 2 else np.zeros_like(g1)
    disc = g1**2 + 4 * g2
    with np.errstate(invalid="ignore"):
        root = (g1 + np.sqrt(np.maximum(disc, 0))) / 2
    bad = ~np.isfinite(g1) | ~np.isfinite(g2) | (disc < 0) | (root >= 1) | (root <= 0) | (g2 > 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ParameterError(
            f"{name}: AR coefficients {g[i].tolist()} (row {i}) do not give a stable, decaying, non-oscillating kernel; "
            "the roots of z^p - g1 z^(p-1) - g2 must be real and in (0, 1). Use noise.estimate_ar or tau_to_ar."
        )


def _search_batch(Y, g, sn, b_fix, c1_fix, lam_fix, s_min, length, *, b_free, c1_free, lam_free, max_iter, exact2,
                  convex):
    """`_search` for N traces (`(N, T)` `Y`, `(N, p)` `g`, `(N,)` the rest but the shared `s_min`), vmapped under
    `LANE_AXIS`; exact AR(2) runs its active-set alternation (`_alternate_exact`) for the whole batch at once in
    time-major layout after the vmapped start. 64 x 10,000 frames (AR(2), b >= 0) on one core: 1.36 s with the
    alternation vmapped, 0.75 s time-major (the same supports and values, bit for bit); 0.64 s with the time-major
    evaluation (`_evaluate_ar2`) and the shorter prefix solve (`_PREFIX_ITERS`).

    **Returns:** `((starts or support (N, T), pinned (N,)), b_guess (N,), settled)`, as `_search` per row.
    """
    flags = dict(b_free=b_free, c1_free=c1_free, lam_free=lam_free, exact2=exact2, max_iter=max_iter, convex=convex)
    search = lambda *args: _search(*args, start_only=exact2, **flags)  # noqa: E731
    out = jax.vmap(search, in_axes=(0, 0, 0, 0, 0, 0, None, 0), axis_name=LANE_AXIS)(
        Y, g, sn, b_fix, c1_fix, lam_fix, s_min, length
    )
    if not exact2:
        return out
    start = jax.tree_util.tree_map(lambda x: x.T, out)  # time-major (the (N,) fields are unchanged)
    g, sn, lam_fix = (jax.lax.stop_gradient(x) for x in (g, sn, lam_fix))
    active = _alternate_exact(start, g[:, 0], g[:, 1], sn, lam_fix, length, b_free=b_free, lam_free=lam_free,
                              max_iter=max_iter)
    return (active.T, jnp.zeros(Y.shape[0], bool)), out.b_start, None


@eqx.filter_jit
def _batch_core(Y, g, sn, b_fix, c1_fix, lam_fix, s_min, length, b_free, c1_free, lam_free, max_iter, exact2, convex):
    _TRACE_COUNT["batch"] += 1
    return _batch_solve(Y, g, sn, b_fix, c1_fix, lam_fix, s_min, length, b_free, c1_free, lam_free, max_iter, exact2,
                        convex, grad=False)


def _batch_solve(Y, g, sn, b_fix, c1_fix, lam_fix, s_min, length, b_free, c1_free, lam_free, max_iter, exact2, convex,
                 grad: bool = True):
    """`_solve` for the rows of `Y` (`(N, T)`; `(N, p)` `g`, `(N,)` the rest but the shared `s_min`): the search by
    `_search_batch`, the evaluation for the whole batch (AR(1) pools and exact AR(2) supports time-major, greedy AR(2)
    pools vmapped). Differentiable in Y, g and sn like `_solve`; with `grad=False` (`deconvolve_batch`, whose inputs
    are concrete) the AR(1) evaluation takes (b, lam) from the nested search instead of solving for them again, and
    the result carries no gradient."""
    flags = dict(b_free=b_free, c1_free=c1_free, lam_free=lam_free, exact2=exact2)
    structure, b_guess, settled = _search_batch(Y, g, sn, b_fix, c1_fix, lam_fix, s_min, length, max_iter=max_iter,
                                                convex=convex, **flags)
    if g.shape[1] == 1 and not exact2:  # AR(1) pools: the whole batch at once in time-major layout
        out = _evaluate_ar1(Y.T, g[:, 0], sn, b_fix, c1_fix, lam_fix, length, structure[0].T, structure[1], b_guess,
                            b_free=b_free, c1_free=c1_free, lam_free=lam_free, settled=None if grad else settled)
        return eqx.tree_at(lambda r: (r.c, r.s, r.g), out, (out.c.T, out.s.T, g))
    if exact2:  # the support's projection for the whole batch at once in time-major layout
        out = _evaluate_ar2(Y.T, g.T, sn, b_fix, c1_fix, lam_fix, length, (structure[0].T, structure[1]), b_guess,
                            b_free=b_free, c1_free=c1_free, lam_free=lam_free, exact=True)
        return eqx.tree_at(lambda r: (r.c, r.s, r.g), out, (out.c.T, out.s.T, g))
    return jax.vmap(lambda *args: _evaluate(*args, **flags))(
        Y, g, sn, b_fix, c1_fix, lam_fix, length, structure, b_guess
    )


TRACE_NOISE_METHOD = "mean"  # PSD averaging for traces' sn (see `_estimate`)


def _estimate(Y: np.ndarray, g, sn, p: int, length: np.ndarray, *, pilot: bool = False):
    """Fill in sn and g with `noise.estimate_noise` / `noise.estimate_ar` where they are not given; returns
    `(g, sn, g1)`, g1 the AR(1) kernel of the same rule when `pilot` and g is estimated (else None), fitted with the
    same noise cut-off (the pilot of `_pilot_decay`).

    The noise band is chosen per trace from its spectrum (`freq_range="auto"`): the fixed 0.25-0.5 band unless the
    trace was resampled or low-pass filtered (`noise.noise_cutoff`, e.g. spikefinder's 100 Hz traces, which hold no
    noise above 0.04-0.3 of the rate), and sn is then the std of that band-limited noise, whose autocovariance
    the AR fit removes at every lag. sn is the plain mean of the PSD over the band (`TRACE_NOISE_METHOD`, as OASIS
    and CaImAn do for traces), not the log-mean that `estimate_noise` defaults to for movies: on real traces the
    band still holds some of the transients' power, and the mean counts it, so the noise budget is a little more
    conservative. AR(1) fits as many lags as its decay time in frames (`lags="auto"`); AR(2) keeps 5 extra lags:
    with long windows its rise root, fitted from the first lags, got worse. All three choices
    were measured on the cascade and spikefinder ground truth (experiments/bench_spikes_real.py, RESULTS.md).
    Measured and not taken (2026-12-03): AR(2) with lags="auto" too (better on 5 of 8 sets, but DS21 -0.046,
    spikefinder6 -0.052); OASIS's shrinking of the roots by 0.98 (wins on DS21, DS29 AR(2) and spikefinder, where
    the autocovariance's decay is too slow for spike timing, but costs DS09 AR(2) 0.069 and DS14 0.03-0.04: the per-frame
    factor's effect depends on the frame rate); an intercept in the Yule-Walker fit to absorb slow drift (far worse).
    After this estimate `deconvolve_batch` refits AR(1) decay times on the first solution (`refine_g`, `_refine_g`).
    Prototype of that refit, all 8 sets (2026-12-03, median corr. vs OASIS): AR(1) ahead on 7 of 8 (DS21 0.558 vs
    0.561; spikefinder6 0.507 -> 0.584 vs 0.544); AR(2), decay root only, ahead on 5 of 8 but DS01 0.362 -> 0.332 and
    DS09 0.381 -> 0.336 (OASIS 0.348 / 0.363), so it is off for AR(2) unless asked for; refitting both roots, or one
    common time scale, or with lam = 0, or a second round, was no better.
    Estimated AR(2) kernels instead take their decay root from a refined AR(1) pilot where the 7-lag AR(2) decay is
    slower than the AR(1) fit's over `lags="auto"` (`_pilot_decay`; the rise root is kept). All 8 sets, AR(2), median
    corr. vs OASIS (2026-12-07, before -> after): DS01 0.362 -> 0.362 (0.348), DS09 0.381 -> 0.375 (0.363), DS14
    0.464 -> 0.486 (0.458), DS21 0.635 -> 0.635 (0.641), DS29 0.722 -> 0.743 (0.735), spikefinder4 0.273 -> 0.389
    (0.169), spikefinder5 0.165 -> 0.228 (0.176), spikefinder6 0.436 -> 0.530 (0.528): ahead on 7 of 8 instead of 4.
    Measured the same day and not taken (AR(2), same sets in that order; OASIS 0.348 0.363 0.458 0.641 0.735 0.169
    0.176 0.528): the refined AR(1) decay for every trace (0.362 0.345 0.486 0.630 0.742 0.389 0.228 0.529: loses DS09);
    that and then the rise root refitted to it by Yule-Walker (0.376 0.442 0.407 0.610 0.715 0.194 0.050 0.298) or with
    lag 0 left out (DS01 0.312, DS09 0.345, DS14 0.333, DS21 0.541); the rise root refitted on the first solution's
    support, alone or after the decay (DS01 0.306 / 0.336, DS09 0.305 / 0.312: the support's residual favours fast
    kernels); the kinetics fitted to a detrended copy (trace minus a moving average over 10 or 30 decay times: 10x
    0.356 0.347 0.489 0.639 0.735 0.283 0.153 0.415); a nonlinear fit of A d^k + B r^k + C (C for drift) to the
    autocovariance over 3 decay times (DS01 0.271, DS09 0.179, DS14 0.158, DS21 0.151); a Whittle fit of the AR(2)
    plus noise spectrum above 0.1 / (2 pi decay time) (noise free: 0.301 0.347 0.445 0.586 0.737 0.388 0.058; noise
    fixed at sn: 0.352 0.374 0.447 0.631 0.741 0.135 0.068; spikefinder6 not run); the decay time scaled by 0.35 / 0.5 / 0.7 for all traces
    (no factor wins DS01, DS09 and spikefinder6 at once: DS09 0.291 / 0.305 / 0.334); choosing per trace between
    the autocovariance and the refitted kernel by the residual's whiteness (DS09 0.337) or the l1 norm per unit
    calcium (the slower kernel on every cascade set). On a (decay x 0.6-1, rise x 1-2.2) grid DS09 peaks at rise x 1.5 (0.463) and
    DS21 at decay x 0.6, rise x 1.5 (0.655), DS29 at decay x 0.6, rise x 1 (0.752): the rise root, which the fit takes
    from the first lags and which moves with sn (2 % less sn: DS01's rise time 0.91 -> 0.68 frames), is what is left.
    """
    if sn is None:
        sn = np.asarray(noise.estimate_noise(Y, freq_range="auto", length=length, method=TRACE_NOISE_METHOD))
    g1 = None
    if g is None:
        fc = noise.noise_cutoff(Y, length=length)

        def fit(q):  # AR(1) over as many lags as its decay time, AR(2) over 5 extra lags
            return np.asarray(noise.estimate_ar(Y, q, sn=sn, length=length, noise_cutoff=fc,
                                                lags="auto" if q == 1 else 5))

        g = fit(p)
        if pilot:  # the AR(1) kernel this rule gives, the pilot of the estimated AR(2) kernels' decay
            g1 = fit(1)
    return g, sn, g1


def deconvolve_batch(
    Y,
    g=None,
    sn=None,
    *,
    length=None,
    p: int = 2,
    baseline="nonneg",
    c1=True,
    lam=None,
    s_min: float = 0.0,
    max_iter: int = 30,
    threads: int | None = None,
    refine_g: bool | None = None,
) -> DeconvResult:
    """Deconvolve every row of `Y` (see the module docstring for the problem); compiled once per shape and options.

    **Arguments:**
    - `Y`: `(N, T)` traces (computed in float64 when Y is float64 and jax's x64 mode is on, else float32).
    - `g`: AR coefficients, `(p,)` shared or `(N, p)` per row; estimated with `noise.estimate_ar` when None.
    - `sn`: noise standard deviation, scalar or `(N,)`; estimated with `noise.estimate_noise(method="mean")` when None.
    - `length`: optional `(N,)` numbers of valid frames (or one int): frames at t >= length are ignored (they may hold
      NaN padding) and returned as 0. One compilation serves any lengths.
    - `p`: AR order when `g` is None (1 or 2); otherwise `g`'s length.
    - `baseline`: "nonneg" (default) to estimate the baseline b >= 0 (as OASIS does by default; on real dF/F traces
      that dip below their resting level a free baseline follows the dips and the noise budget then buys spikes on
      slow drift), True to estimate it with either sign (CaImAn's `bas_nonneg=False`), or a number to fix it.
    - `c1`: True to estimate the initial value c1 >= 0, or a number to fix it (False means 0).
    - `lam`: None to meet the noise constraint, or the sparsity weight of the penalised form.
    - `s_min`: minimum spike size (0: the convex problem; > 0: thresholded pools, a heuristic).
    - `max_iter`: bound on the alternations between pool merging and the closed-form (lam, b) update.
    - `threads`: on the CPU backend, the rows are split into equal blocks of at most `CPU_BLOCK_ROWS[p]` rows, solved
      `threads` at a time from a thread pool (XLA runs each block's sequential pool merging on one core; AR(2)'s
      small blocks stay in cache and wait for fewer slow rows). None: one thread per available core, for batches of
      at least 64 rows per thread; 1: one at a time. Ignored on GPU/TPU, where one batch fills the device. Results
      do not depend on it (rows are solved independently).
    - `refine_g`: solve twice: the second time with g refitted to the first solution (`_refine_g`: the decay time
      minimising the residual on the first solution's spike support, its baseline and lam held fixed; for AR(2) the
      rise root is kept). Each solve is exact for its g; `result.g` is the refitted g. None (default): refine AR(1)
      kernels estimated here (`g=None`); estimated AR(2) kernels take the decay root of the refined AR(1) kernel
      where their own decay is slower than the AR(1) estimate's (`_pilot_decay`: an AR(1) solve and refit first; on
      the real-data benchmark the plain AR(2) refit won on 5 of 8 sets and lost 0.03-0.05 on two, this rule wins on
      7 of 8, see `_estimate`); given kernels are left as they are. False: the estimates as they are. It costs about
      one more solve.

    **Returns:** a `DeconvResult` whose fields have a leading axis N.

    Raises `TraceError` (naming the row) for non-finite values inside the valid frames or traces shorter than 4 p
    frames, and `ParameterError` for invalid options, before anything is compiled.
    """
    Y = np.asarray(Y)
    if Y.ndim != 2:
        raise TraceError(f"Y: expected a 2-D array (traces x frames), got shape {Y.shape}; use deconvolve for one trace.")
    dtype = np.float64 if (Y.dtype == np.float64 and jax.config.jax_enable_x64) else np.float32
    N, T = Y.shape
    if g is not None:
        p = int(np.shape(g)[-1])
    _check_static(p, s_min, lam, max_iter)
    b_free, b_value = _mode(baseline, "baseline", nonneg=True)
    c1_free, c1_value = _mode(c1, "c1")
    if length is None:
        length = np.full(N, T, np.int32)
    length = np.broadcast_to(np.asarray(length), (N,)).astype(np.int64)
    if (length > T).any() or (length < 0).any():
        raise TraceError(f"length: every entry must be in 0..{T} (the number of frames), got {length.min()}..{length.max()}.")
    short = np.flatnonzero(length < 4 * p)
    if short.size:
        raise TraceError(
            f"Y: trace {int(short[0])} has {int(length[short[0]])} valid frames; AR({p}) deconvolution needs at least "
            f"{4 * p}. Drop it or use a lower p."
        )
    valid = np.arange(T)[None, :] < length[:, None]
    bad = valid & ~np.isfinite(Y)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise TraceError(
            f"Y: trace {i} has a non-finite value at frame {int(np.flatnonzero(bad[i])[0])} inside its valid frames; "
            "only trailing padding (frames at or after `length`) may be NaN. Pass length= for padded rows, or repair it."
        )
    Y = np.where(valid, Y, 0).astype(dtype)
    refine = (g is None and p == 1) if refine_g is None else bool(refine_g)
    pilot = g is None and p == 2 and refine_g is None  # estimated AR(2): decay from a refined AR(1) pilot (`_pilot_decay`)
    g, sn, g1 = _estimate(Y, g, sn, p, length, pilot=pilot) if (g is None or sn is None) else (g, sn, None)
    g = np.broadcast_to(np.asarray(g, dtype), (N, p))
    _check_g(g, "g")
    sn = np.broadcast_to(np.asarray(sn, dtype), (N,))
    if not np.isfinite(sn).all() or (sn < 0).any():
        raise ParameterError("sn: noise levels must be finite and >= 0.")
    rows = (Y, g, sn, np.full(N, b_value, dtype), np.full(N, c1_value, dtype),
            np.full(N, 0.0 if lam is None else lam, dtype), length.astype(np.int32))
    fills = (0, g[0], 1, 0, 0, 0, T)
    if pilot:
        g1 = np.broadcast_to(np.asarray(g1, dtype), (N, 1))
        rows, fills = rows + (g1,), fills + (g1[0],)
    options = (b_free, c1_free, lam is None, int(max_iter), p == 2 and float(s_min) == 0.0, float(s_min) == 0.0)
    options1 = options[:4] + (False,) + options[5:]  # the AR(1) pilot's

    def solve(block):
        Yb, gb, snb, bb, c1b, lamb, lb = (jnp.asarray(r) for r in block[:7])
        if pilot:
            g1 = jnp.asarray(block[7])
            first = _batch_core(Yb, g1, snb, bb, c1b, lamb, jnp.asarray(s_min, dtype), lb, *options1)
            g1r = _refine_core(Yb, first.g, first.s, first.b, first.c1, first.lam, lb, c1_free)
            gb = _pilot_decay(gb, g1, g1r)
        out = _batch_core(Yb, gb, snb, bb, c1b, lamb, jnp.asarray(s_min, dtype), lb, *options)
        if refine:
            gb = _refine_core(Yb, out.g, out.s, out.b, out.c1, out.lam, lb, c1_free)
            out = _batch_core(Yb, gb, snb, bb, c1b, lamb, jnp.asarray(s_min, dtype), lb, *options)
        return out

    workers = _n_blocks(N, threads)
    size = -(-N // workers)
    if jax.default_backend() == "cpu":
        size = min(size, CPU_BLOCK_ROWS[p])
    n_blocks = -(-N // size)
    if n_blocks == 1:
        return solve(rows)
    # equal blocks (one compiled shape); the last is padded with all-zero rows
    pad = lambda r, fill: np.concatenate([r, np.broadcast_to(fill, (size * n_blocks - N,) + r.shape[1:])])
    padded = [pad(r, f) for r, f in zip(rows, fills)]
    blocks = [tuple(r[k * size : (k + 1) * size] for r in padded) for k in range(n_blocks)]
    with Pool(workers) as pool:  # each worker computes in the caller's x64 mode
        parts = list(pool.map(lambda b: jax.block_until_ready(solve(b)), blocks))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs)[:N], *parts)


CPU_BLOCK_ROWS = {1: 512, 2: 64}
"""Most rows per block `deconvolve_batch` solves at once on CPU, per AR order. AR(2)'s active-set steps are short
banded scans whose cost per row grows with the block (cache) and whose step count is the block's slowest row (512 x
10,000-frame traces, 2 threads: 64 rows 35.4 vs 256 rows 29.7 traces/s). AR(1) gains from XLA's own threads on larger
blocks (1,000 x 10,000, 2 threads: 128 rows 300, 512 rows 330 traces/s)."""


def _n_blocks(N: int, threads: int | None) -> int:
    """How many row blocks `deconvolve_batch` solves concurrently (see its `threads` argument)."""
    if threads is not None:
        if not isinstance(threads, (int, np.integer)) or threads < 1:
            raise ParameterError(f"threads={threads!r}: expected None or a positive integer.")
    if jax.default_backend() != "cpu":
        return 1
    if threads is None:
        threads = min(host_threads(limit=1 << 10), N // 64)
    return max(1, min(int(threads), N))


def deconvolve(
    y, g=None, sn=None, *, p: int = 2, baseline="nonneg", c1=True, lam=None, s_min: float = 0.0, max_iter: int = 30,
    refine_g: bool | None = None,
) -> DeconvResult:
    """Deconvolve ONE trace (see the module docstring for the problem and the algorithm); jit- and vmap-able.

    Called with concrete arrays it checks its inputs and estimates missing `g`/`sn` first; inside `jit`/`vmap` (traced
    inputs) `g` and `sn` must be given, `baseline`, `c1` stay Python options and `lam`, `s_min` must be numbers.

    **Arguments:**
    - `y`: `(T,)` trace.
    - `g`: `(p,)` AR coefficients (estimated with `noise.estimate_ar` when None).
    - `sn`: noise standard deviation (estimated with `noise.estimate_noise` when None).
    - `p`, `baseline`, `c1`, `lam`, `s_min`, `max_iter`, `refine_g`: as in `deconvolve_batch` (inside `jit`/`vmap`,
      where g is given, None means False).

    **Returns:** a `DeconvResult`.
    """
    traced = any(isinstance(v, jax.core.Tracer) for v in (y, g, sn))
    if not traced:
        y_np = np.asarray(y)
        if y_np.ndim != 1:
            raise TraceError(f"y: expected one trace (1-D), got shape {y_np.shape}; use deconvolve_batch for several.")
        out = deconvolve_batch(
            y_np[None], None if g is None else np.asarray(g)[None], None if sn is None else np.asarray(sn).reshape(1),
            p=p, baseline=baseline, c1=c1, lam=lam, s_min=s_min, max_iter=max_iter, refine_g=refine_g,
        )
        return jax.tree_util.tree_map(lambda x: x[0], out)
    if g is None or sn is None:
        raise ParameterError("deconvolve inside jit/vmap needs g and sn; estimate them first (noise.estimate_ar).")
    y = _to_float(y)
    dt = y.dtype
    T = y.shape[0]
    g = jnp.asarray(g, dt).reshape(-1)
    options, b_value, c1_value = _traced_options(g.shape[0], baseline, c1, lam, s_min, max_iter)
    args = (jnp.asarray(sn, dt), jnp.asarray(b_value, dt), jnp.asarray(c1_value, dt),
            jnp.asarray(0.0 if lam is None else lam, dt), jnp.asarray(s_min, dt), jnp.asarray(T, jnp.int32))
    out = _solve(y, g, *args, **options)
    if refine_g:
        g = _refine_g(y, g, out.s, out.b, out.c1, out.lam, args[-1], c1_free=options["c1_free"])
        out = _solve(y, g, *args, **options)
    return out


def _traced_options(p: int, baseline, c1, lam, s_min, max_iter) -> tuple[dict, float, float]:
    """The static options of a solve with given g and sn (`deconvolve` inside jit/vmap, `deconvolve_rows`): the
    keyword arguments of `_solve` / `_batch_solve`, and the fixed values of b and c1."""
    b_free, b_value = _mode(baseline, "baseline", nonneg=True)
    c1_free, c1_value = _mode(c1, "c1")
    options = dict(
        b_free=b_free,
        c1_free=c1_free,
        lam_free=lam is None,
        max_iter=int(max_iter),
        exact2=p == 2 and not (isinstance(s_min, (int, float)) and s_min > 0),
        convex=isinstance(s_min, (int, float)) and s_min == 0,  # a traced s_min takes the general path
    )
    return options, b_value, c1_value


def deconvolve_rows(Y, g, sn, *, baseline="nonneg", c1=True, lam=None, s_min: float = 0.0,
                    max_iter: int = 30) -> DeconvResult:
    """Deconvolve every row of `Y` with given kinetics and noise: `jax.vmap(deconvolve)` as one batched computation,
    for use inside `jit`/`grad` (no input checks, no estimation, no threads: see `deconvolve_batch` for that).

    The same problem and the same solution as `deconvolve` row by row (to float rounding), faster: exact AR(2)
    searches the whole batch's spike supports at once in time-major layout (`_alternate_exact`) and AR(1) evaluates
    its pools that way; vmapped, each banded solve would transpose its traces. Differentiable in `Y`, `g` and `sn`.

    **Arguments:**
    - `Y`: `(N, T)` traces; `g`: `(N, p)` AR coefficients; `sn`: `(N,)` noise levels.
    - `baseline`, `c1`, `lam`, `s_min`, `max_iter`: as in `deconvolve` (`lam`, `s_min` numbers).

    **Returns:** a `DeconvResult` with `(N, ...)` fields.
    """
    Y = _to_float(Y)
    dt = Y.dtype
    N, T = Y.shape
    g = jnp.asarray(g, dt).reshape(N, -1)
    options, b_value, c1_value = _traced_options(g.shape[1], baseline, c1, lam, s_min, max_iter)
    full = lambda v: jnp.broadcast_to(jnp.asarray(v, dt), (N,))  # noqa: E731
    return _batch_solve(Y, g, full(sn), full(b_value), full(c1_value), full(0.0 if lam is None else lam),
                        jnp.asarray(s_min, dt), jnp.full(N, T, jnp.int32), **options)
