"""The sparse vector technique (SVT) of DSSGD (Shokri & Shmatikov 2015, Algorithm 2), vectorised.

Per participant step with budget `epsilon`, c = upload count, gamma = clip bound, Df = 2 * gamma:

    t = tau + Lap(2 c Df / eps1)
    visit indices in random order until c are chosen or none remain:
        if |clip(dw_j)| + Lap(4 c Df / eps1) >= t:
            release clip(clip(dw_j) + Lap(2 c Df / eps2), gamma); t = tau + Lap(2 c Df / eps1)

where clip(x) = min(max(x, -gamma), gamma) (NaN counts as 0, +-inf as +-gamma).

Privacy unit: any change of the participant's whole data for one upload (every coordinate of dw
may change at once). Clipping bounds each test query |clip(dw_j)| to [0, gamma] and each released
pre-noise value clip(dw_j) to [-gamma, gamma] whatever the data, so:

* Selection. The query q_j = |clip(dw_j)| has sensitivity Delta = gamma = Df / 2. The threshold
  noise Lap(2 c Df / eps1) = Lap(2 Delta / e') and the query noise Lap(4 c Df / eps1) =
  Lap(4 Delta / e'), with e' = eps1 / (2 c), are those of AboveThreshold (Dwork & Roth 2014,
  Algorithm 1 and Theorem 3.23; Lyu, Su & Li 2017, "Understanding the sparse vector technique for
  differential privacy", Alg. 1 with a fresh threshold per positive outcome), which is e'-DP for
  any stream of sensitivity-Delta queries, the stream ending at the first positive outcome or with
  none. The visiting order is a data-independent random permutation, and the threshold redrawn
  after each hit starts a new AboveThreshold instance on the remaining indices: at most c
  instances, composed sequentially, cost c * e' = eps1 / 2 for the released index set.
* Release. Given the selected indices, the c pre-noise values clip(dw_j) lie in [-gamma, gamma],
  so each moves by at most Df and the vector by at most c * Df in L1; Laplace noise of scale
  2 c Df / eps2 per value is the Laplace mechanism at (c Df) / (2 c Df / eps2) = eps2 / 2. The
  outer clip and the float32 cast are post-processing.
* Total (sequential composition): eps1 / 2 + eps2 / 2. For the paper's split (eps1, eps2) =
  (8/9, 2/9) eps (`split="published"`, default) that is 5/9 eps, not the 10/9 eps the two shares
  nominally sum to; for `split="corrected"` (8/9, 1/9) eps it is 1/2 eps. `SvtScales.epsilon_spent`
  and the returned epsilon are this true cost; it is what the caller must charge.

Before this fix the release added the noise to the raw dw_j, whose sensitivity is unbounded: an
audit of neighbours differing by 50 gamma measured a privacy loss of 3.48 where 1.11 was charged
(tests/test_privacy_audit_svt.py, benchmarks/audit_svt.py).

Noise. All noise is float64 from the caller's `NoiseSource` (or numpy Generator, wrapped in one):
the selection noise (many draws, only compared, never released) with `NoiseSource.laplace`, the c
released values' noise likewise, since OpenDP's safe sampler would multiply the upload's cost by
30-100x (see ecos_flower.privacy.noise for the measurement and the residual floating-point risk).

Vectorisation. `svt_select` draws the noise for a whole chunk of visited candidates at once and
indexes the threshold by the position of the last hit (the threshold in force after a hit at
position p is a fresh draw T[p + 1]; every threshold is still a fresh independent Laplace draw, so
the output has exactly the published distribution). For every possible segment start p it finds
the first hit at or after p with a few vectorised look-ahead passes (numpy argmax on the
comparison for the rare long gaps); the only sequential part is following the chain of hits (one
list lookup per release). `svt_select_reference` is the plain per-element loop, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ecos_flower.dssgd.selection import upload_count
from ecos_flower.dssgd.sparse import SparseUpdate
from ecos_flower.privacy.noise import NoiseSource

SvtSplit = Literal["published", "corrected"]

_MAX_LOOKAHEAD = 256  # vectorised look-ahead passes at most (fewer once 99 % are resolved)
_HOPS = 16  # hits consumed per step of the chain follower (a jump table of 16 hops)
_MIN_CHUNK = 1 << 14


@dataclass(frozen=True)
class SvtScales:
    """Laplace scales of one SVT run and the epsilon it is accounted as."""

    count: int
    threshold: float  # 2 c Df / eps1
    query: float  # 4 c Df / eps1
    release: float  # 2 c Df / eps2
    epsilon_spent: float  # eps1 / 2 + eps2 / 2: the true cost (module docstring)


def svt_scales(
    epsilon: float, count: int, gamma: float, split: SvtSplit = "published"
) -> SvtScales:
    """The three Laplace scales for budget `epsilon`, upload count c = `count`, clip bound `gamma`.

    `epsilon_spent` is the mechanism's true cost eps1 / 2 + eps2 / 2 (5/9 `epsilon` for the
    published split, 1/2 `epsilon` for the corrected one; derivation in the module docstring).
    """
    if not (epsilon > 0 and np.isfinite(epsilon)):
        raise ValueError(f"epsilon must be positive and finite, got {epsilon}")
    if not gamma > 0:
        raise ValueError(f"the SVT needs a positive clip bound gamma, got {gamma}")
    if split == "published":
        eps1, eps2 = 8.0 / 9.0 * epsilon, 2.0 / 9.0 * epsilon
    elif split == "corrected":
        eps1, eps2 = 8.0 / 9.0 * epsilon, 1.0 / 9.0 * epsilon
    else:
        raise ValueError(f"split must be 'published' or 'corrected', got {split!r}")
    sensitivity = 2.0 * gamma
    c = max(count, 1)
    return SvtScales(
        count=count,
        threshold=2.0 * c * sensitivity / eps1,
        query=4.0 * c * sensitivity / eps1,
        release=2.0 * c * sensitivity / eps2,
        epsilon_spent=eps1 / 2.0 + eps2 / 2.0,
    )


def _noise_source(rng: np.random.Generator | NoiseSource) -> NoiseSource:
    """The caller's noise source (a bare Generator is wrapped); no default: privacy noise must
    come from the caller."""
    if isinstance(rng, NoiseSource):
        return rng
    if isinstance(rng, np.random.Generator):
        return NoiseSource(rng)
    raise TypeError(
        f"the SVT needs the caller's NoiseSource or numpy Generator, got {type(rng).__name__}"
    )


def _clipped(values: np.ndarray, gamma: float) -> np.ndarray:
    """clip(dw) in float64: NaN -> 0, +-inf -> +-gamma, so every entry is in [-gamma, gamma]."""
    out = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=gamma, neginf=-gamma)
    np.clip(out, -gamma, gamma, out=out)
    return out


def _clipped_magnitude(delta: np.ndarray, gamma: float) -> np.ndarray:
    """|clip(dw)| as float32 in [0, gamma] (NaN -> 0): the test query, one pass over float32."""
    g32 = np.float32(gamma)
    if float(g32) > gamma:  # never let float32 rounding exceed the sensitivity bound
        g32 = np.nextafter(g32, np.float32(0))
    out = np.abs(delta)
    np.minimum(out, g32, out=out)
    out[np.isnan(out)] = 0.0
    return out


def _first_hits(u: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For every start p: the first j >= p with u[j] >= t[p]; -1 where the look-ahead did not
    find it.

    Look-ahead pass w tests u[p + w] >= t[p]: on contiguous slices while over 5 % of starts are
    open, then on the open starts only, until under 0.05 % remain. With sparse hits (after 8
    passes over half still open and a pass resolves under 20 % of them) it stops early: the chain
    follower's argmax search is then cheaper.
    """
    m = u.shape[0]
    first = np.full(m + 1, -1, dtype=np.int64)  # first[m] = -1: a start past the end
    open_mask = np.ones(m, dtype=bool)
    n_open, w = m, 0
    # Phase 1: contiguous passes while many starts are open.
    while w < min(_MAX_LOOKAHEAD, m) and n_open > m // 20:
        hit_at = np.flatnonzero(open_mask[: m - w] & (u[w:] >= t[: m - w]))
        first[hit_at] = hit_at + w
        open_mask[hit_at] = False
        n_open -= hit_at.shape[0]
        w += 1
        if w >= 8 and n_open > m // 2 and hit_at.shape[0] < 0.2 * (n_open + hit_at.shape[0]):
            return first  # sparse hits: leave the rest to the argmax search
    # Phase 2: gather passes over the few open starts only.
    open_ = np.flatnonzero(open_mask)
    while w < _MAX_LOOKAHEAD and open_.shape[0] > m // 2000:
        j = open_ + w
        inside = j < m
        open_, j = open_[inside], j[inside]
        hit = u[j] >= t[open_]
        first[open_[hit]] = j[hit]
        open_ = open_[~hit]
        w += 1
    return first


def _jump_table(first: np.ndarray, hops: int) -> np.ndarray:
    """jump[p]: the start after `hops` consecutive resolved hits from start p (`len(first)` if
    unknown)."""
    sentinel = first.shape[0]
    jump = np.empty(sentinel + 1, dtype=np.int64)
    jump[:sentinel] = np.where(first >= 0, first + 1, sentinel)
    jump[sentinel] = sentinel
    done = 1
    while done < hops:
        jump = jump[jump]
        done *= 2
    return jump


def _search(u: np.ndarray, threshold: float, start: int) -> int:
    """First j >= start with u[j] >= threshold (argmax over growing blocks), or -1."""
    m, block = u.shape[0], 256
    while start < m:
        seg = u[start : start + block] >= threshold
        k = int(seg.argmax())
        if seg[k]:
            return start + k
        start += block
        block *= 4
    return -1


def svt_select(
    delta: np.ndarray,
    theta_u: float,
    *,
    epsilon: float,
    gamma: float,
    tau: float,
    rng: np.random.Generator | NoiseSource,
    split: SvtSplit = "published",
) -> tuple[SparseUpdate, float]:
    """Vectorised SVT upload selection: (update sorted by index, epsilon spent).

    The epsilon spent is the true cost eps1 / 2 + eps2 / 2 (module docstring); all noise comes
    from `rng`, the caller's `NoiseSource` (or a numpy Generator, wrapped in one).
    """
    source = _noise_source(rng)
    gen = source.generator  # the visiting order
    delta = np.asarray(delta, dtype=np.float32).ravel()
    n = delta.shape[0]
    count = upload_count(theta_u, n)
    scales = svt_scales(epsilon, count, gamma, split)
    if count == 0:
        return SparseUpdate.empty(), 0.0
    magnitude = _clipped_magnitude(delta, gamma)  # |clip(dw_j)|: the test query, sensitivity gamma
    hits: list[np.ndarray] = []  # released indices, one array per chunk
    n_hits = 0
    unvisited: np.ndarray | None = None  # mask of not yet visited indices, built on a second chunk
    visited = 0
    carried: float | None = None  # threshold carried across a chunk boundary (None: draw fresh)
    size = min(n, max(2 * count, _MIN_CHUNK))  # enough when at least half of the visits are hits
    while n_hits < count and visited < n:
        # The next `size` indices of a uniformly random visiting order.
        if unvisited is None and size >= n:
            order = gen.permutation(n)
        elif unvisited is None:
            order = gen.choice(n, size=size, replace=False)
            unvisited = np.ones(n, dtype=bool)
        else:
            rest = np.flatnonzero(unvisited)
            order = rest[gen.choice(rest.shape[0], size=min(size, rest.shape[0]), replace=False)]
        if unvisited is not None:
            unvisited[order] = False
        m = order.shape[0]
        visited += m
        # Selection noise: float64, only compared, never released.
        u = magnitude[order] + source.laplace(scales.query, m)
        t = source.laplace(scales.threshold, m) + float(tau)
        if carried is not None:
            t[0] = carried
        first = _first_hits(u, t)
        jump = _jump_table(first, _HOPS)
        sentinel = first.shape[0]
        p, found, need = 0, 0, count - n_hits
        starts: list[int] = []  # starts of _HOPS-hit jumps, expanded below with numpy
        singles: list[int] = []
        while p < m and found < need:
            if need - found >= _HOPS:
                q = int(jump[p])
                if q != sentinel:
                    starts.append(p)
                    p = q
                    found += _HOPS
                    continue
            j = int(first[p])
            if j < 0:  # a long gap the look-ahead did not resolve
                j = _search(u, float(t[p]), p)
                if j < 0:
                    break
            singles.append(j)
            found += 1
            p = j + 1
        chunk_hits = [np.asarray(singles, dtype=np.int64)]
        cur = np.asarray(starts, dtype=np.int64)
        for _ in range(_HOPS if cur.size else 0):
            j_arr = first[cur]
            chunk_hits.append(j_arr)
            cur = j_arr + 1
        hits.append(order[np.concatenate(chunk_hits)])
        n_hits += hits[-1].shape[0]
        carried = None if p >= m else float(t[p])
        # Size the next chunk from the hit rate seen so far (at least 2x the remaining need).
        rate = max(n_hits / visited, 1e-3)
        size = int(min(n - visited, max(2 * (count - n_hits) / rate, _MIN_CHUNK)))
    idx = np.concatenate(hits).astype(np.int64) if hits else np.zeros(0, dtype=np.int64)
    # Release noise on the *clipped* value (sensitivity Df per value), then clip again.
    noisy = _clipped(delta[idx], gamma) + source.laplace(scales.release, idx.shape[0])
    values = np.clip(noisy, -gamma, gamma).astype(np.float32)
    order = np.argsort(idx)
    return SparseUpdate(idx[order], values[order]), scales.epsilon_spent


def svt_select_reference(
    delta: np.ndarray,
    theta_u: float,
    *,
    epsilon: float,
    gamma: float,
    tau: float,
    rng: np.random.Generator | NoiseSource,
    split: SvtSplit = "published",
) -> tuple[SparseUpdate, float]:
    """The per-element loop of the module docstring, literally (slow; the reference for tests
    and benchmarks)."""
    gen = _noise_source(rng).generator

    def lap(scale: float) -> float:  # float64 scalar Laplace (an independent sampler, same law)
        return float(gen.laplace(0.0, scale))

    delta = np.asarray(delta, dtype=np.float32).ravel()
    n = delta.shape[0]
    count = upload_count(theta_u, n)
    scales = svt_scales(epsilon, count, gamma, split)
    if count == 0:
        return SparseUpdate.empty(), 0.0
    clipped = _clipped(delta, gamma)
    idx: list[int] = []
    vals: list[float] = []
    threshold = tau + lap(scales.threshold)
    for j in gen.permutation(n).tolist():
        if len(idx) >= count:
            break
        cw = float(clipped[j])  # clip(dw_j)
        if abs(cw) + lap(scales.query) >= threshold:
            idx.append(j)
            vals.append(min(max(cw + lap(scales.release), -gamma), gamma))
            threshold = tau + lap(scales.threshold)
    indices = np.asarray(idx, dtype=np.int64)
    values = np.asarray(vals, dtype=np.float32)
    order = np.argsort(indices)
    return SparseUpdate(indices[order], values[order]), scales.epsilon_spent
