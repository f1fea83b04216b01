"""Exact float64 references for the deconvolution tests: dense NNLS solvers and duality-gap certificates (test-only).

Independent of jaxcnmf's own code: numpy/scipy only. `penalized_nnls` / `constrained_nnls` solve small problems
exactly (Lawson-Hanson NNLS plus 1-D root searches); `constrained_gap` / `penalized_gap` turn ANY candidate solution into
a certified lower bound on the optimum (weak duality), which checks long traces in O(T).
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.signal


def ar_impulse(g, T: int) -> np.ndarray:
    """Impulse response h (h_0 = 1) of the AR(p) filter s_t = c_t - sum_j g_j c_{t-j}, T samples."""
    g = np.atleast_1d(np.asarray(g, np.float64))
    impulse = np.zeros(T)
    impulse[0] = 1.0
    return scipy.signal.lfilter([1.0], np.concatenate([[1.0], -g]), impulse)


def kernel_matrix(g, T: int) -> np.ndarray:
    """Lower-triangular Toeplitz K with c = K s (K[t, j] = h_{t-j})."""
    h = ar_impulse(g, T)
    return scipy.linalg.toeplitz(h, np.zeros(T))


def ar_filter(g, c) -> np.ndarray:
    """s = G c."""
    g = np.atleast_1d(np.asarray(g, np.float64))
    return scipy.signal.lfilter(np.concatenate([[1.0], -g]), [1.0], c)


def kernel_transpose(g, w) -> np.ndarray:
    """K' w (the adjoint of c = K s), by filtering the reversed signal."""
    g = np.atleast_1d(np.asarray(g, np.float64))
    return scipy.signal.lfilter([1.0], np.concatenate([[1.0], -g]), np.asarray(w, np.float64)[::-1])[::-1]


def penalty_vector(T: int, c1_free: bool) -> np.ndarray:
    """q with objective q's: every spike costs 1, except s_0 when the initial value c1 is free."""
    q = np.ones(T)
    if c1_free:
        q[0] = 0.0
    return q


def penalized_nnls(y, g, lam: float, *, b: float | None = 0.0, c1_free: bool = True):
    """Exact solution of min 1/2||y - b - K s||^2 + lam q's over s >= 0 (and b when `b` is None).

    For fixed b, K is invertible, so with u = K^{-T} q the objective is 1/2||y - b - lam u - K s||^2 + const: an NNLS.
    For free b, the optimal value is convex in b with derivative -sum(r(b)) (non-decreasing), whose root is found with
    Brent's method.

    **Returns:** dict with c, s, b, r (residual), obj.
    """
    y = np.asarray(y, np.float64)
    T = y.size
    K = kernel_matrix(g, T)
    q = penalty_vector(T, c1_free)
    u = scipy.linalg.solve_triangular(K.T, q, lower=False)

    def solve(bv):
        s, _ = scipy.optimize.nnls(K, y - bv - lam * u, maxiter=50 * T)
        c = K @ s
        r = y - bv - c
        return dict(c=c, s=s, b=bv, r=r, obj=0.5 * r @ r + lam * q @ s)

    if b is not None:
        return solve(float(b))
    span = np.ptp(y) + 1.0
    lo, hi = y.min() - 2 * span, y.max() + 2 * span
    f = lambda bv: solve(bv)["r"].sum()
    flo, fhi = f(lo), f(hi)
    if flo * fhi > 0:  # sum(r) has no sign change: b is not determined (lam ~ 0); any endpoint is optimal
        return solve(lo if abs(flo) < abs(fhi) else hi)
    return solve(scipy.optimize.brentq(f, lo, hi, xtol=1e-12, rtol=1e-14))


def constrained_nnls(y, g, sn: float, *, b: float | None = None, c1_free: bool = True):
    """Exact solution of min q's s.t. ||y - b - K s||^2 <= sn^2 T, s >= 0: lam found by Brent on RSS(lam) = sn^2 T.

    **Returns:** dict with c, s, b, r, lam, obj (= q's).
    """
    y = np.asarray(y, np.float64)
    T = y.size
    q = penalty_vector(T, c1_free)
    target = sn**2 * T

    def excess(lam):
        sol = penalized_nnls(y, g, lam, b=b, c1_free=c1_free)
        return sol["r"] @ sol["r"] - target

    lam_hi = 1.0
    while excess(lam_hi) < 0:
        lam_hi *= 4
        if lam_hi > 1e8:
            break
    if excess(1e-9) >= 0:
        lam = 0.0
    else:
        lam = scipy.optimize.brentq(excess, 0.0, lam_hi, xtol=1e-13, rtol=1e-13)
    sol = penalized_nnls(y, g, lam, b=b, c1_free=c1_free)
    sol["lam"] = lam
    sol["obj"] = q @ sol["s"]
    return sol


def _dual_candidate(y, g, r, *, b_free: bool, c1_free: bool):
    """A residual turned into a point obeying the dual's equality constraints: 1'w = 0 (free b), (K'w)_0 <= 0 (free c1)."""
    w = np.asarray(r, np.float64).copy()
    T = w.size
    if b_free:
        w -= w.mean()
    if c1_free:
        Kw0 = kernel_transpose(g, w)[0]
        if Kw0 > 0:
            z = np.zeros(T)
            z[0] = 1.0
            if b_free:
                z -= 1.0 / T
            w -= Kw0 / kernel_transpose(g, z)[0] * z
    return w


def constrained_gap(y, g, sn: float, s, *, b_free: bool = True, b: float = 0.0, c1_free: bool = True, c1: float = 0.0,
                    r=None):
    """Certified lower bound on the optimum of min q's s.t. ||y - b - c1 d - K s||^2 <= sn^2 T, s >= 0.

    Weak duality: for w with 1'w = 0 (free b) and K'w <= q/mu, q's >= mu (w'y - ||w||^2/2 - sn^2 T/2) for every
    feasible point; with w = kappa r (r the candidate's residual) and the best kappa, mu this is
    (r'y - sn sqrt(T) ||r||) / max_t((K'r)_t / q_t).

    **Arguments:**
    - `y`, `g`, `sn`: the problem; `s`: candidate spikes (s[0] excluded from the objective when c1 is free);
    - `b_free`/`b`, `c1_free`/`c1`: whether baseline / initial value are free, else their fixed values;
    - `r`: the candidate's residual y - b - c.

    **Returns:** `(objective, lower_bound)`.
    """
    y = np.asarray(y, np.float64)
    T = y.size
    q = penalty_vector(T, c1_free)
    obj = float(q @ np.asarray(s, np.float64))
    yb = y - (0.0 if b_free else b) - (0.0 if c1_free else c1 * ar_impulse(g, T))
    w = _dual_candidate(y, g, r, b_free=b_free, c1_free=c1_free)
    Kw = kernel_transpose(g, w)
    pos = q > 0
    m = np.max(Kw[pos] / q[pos])
    nw = np.linalg.norm(w)
    if m <= 0 or nw == 0:
        return obj, 0.0
    return obj, float((w @ yb - sn * np.sqrt(T) * nw) / m)


def penalized_gap(y, g, lam: float, s, r, *, b_free: bool = True, b: float = 0.0, c1_free: bool = True):
    """Primal value and certified lower bound of min 1/2||y - b - K s||^2 + lam q's, s >= 0 (dual: w'y - ||w||^2/2).

    **Returns:** `(primal, lower_bound)`.
    """
    y = np.asarray(y, np.float64)
    T = y.size
    q = penalty_vector(T, c1_free)
    r = np.asarray(r, np.float64)
    primal = 0.5 * r @ r + lam * q @ np.asarray(s, np.float64)
    yb = y - (0.0 if b_free else b)
    w = _dual_candidate(y, g, r, b_free=b_free, c1_free=c1_free)
    Kw = kernel_transpose(g, w)
    pos = q > 0
    m = np.max(Kw[pos] / q[pos])
    kappa = 1.0 if m <= lam else lam / m
    w = kappa * w
    return float(primal), float(w @ yb - 0.5 * w @ w)


def simulate_trace(rng, T: int, g, sn: float, *, rate: float = 0.03, b: float = 1.0, c0: float = 0.0) -> np.ndarray:
    """AR(p) calcium driven by sparse exponential spikes, plus a baseline and white noise (float64)."""
    s = (rng.random(T) < rate) * rng.exponential(1.0, T)
    s[0] += c0
    c = scipy.signal.lfilter([1.0], np.concatenate([[1.0], -np.atleast_1d(g)]), s)
    return c + b + sn * rng.standard_normal(T)
