"""Privacy noise for releases: one `NoiseSource` per release boundary (pure numpy, no Flower).

Seeding. `NoiseSource.fresh()` seeds a numpy PCG64 generator with 256 bits from the OS CSPRNG
(`secrets`); nothing about the run (its seed, the round, the node id) enters, so the noise cannot
be recomputed by whoever knows the run's configuration. `NoiseSource.replayable(seed, stream)` is
for research runs that must repeat: `SeedSequence([seed, stream])`, one stream per release, and
its noise is only as secret as the seed.

Samplers. `laplace` and `gaussian` return float64 samples from the generator: Laplace as a
standard exponential (numpy's ziggurat, full float64 resolution) with an independent random sign
bit, Gaussian from numpy's ziggurat. These are fast and replayable, but they are textbook
floating-point samplers: Mironov (2012, "On significance of the least significant bits for
differential privacy") showed that the set of doubles `x + noise` can reach depends on `x`, so one
released double can reveal which neighbour it came from. They are the right tool for noise that
is only *compared* and never released (the SVT's threshold and query noise: only the outcome of
each comparison leaves, and the probability of a comparison outcome depends on the sampler only
through its distribution function, which float64 sampling matches to about 1e-16 relative error
except in the far tails; no noisy double is ever published), and for replayable research runs.

`laplace_release(values, scale)` / `gaussian_release(values, sigma)` return values + noise for a
release. On a `fresh()` source they use OpenDP's floating-point-safe samplers
(`opendp.measurements.make_laplace` / `make_gaussian` over float vectors: exact sampling of a
discretised distribution on a grid of 2^k, with the output rounded to that grid, so the reachable
output set does not depend on the input); they take their own randomness from the OS, so on a
`replayable()` source (or one built from a caller's generator) the release methods fall back to
the numpy samplers above. OpenDP's samplers cost about 20-80 us per value, 500-5000x numpy per
value (benchmarks/bench_noise.py, same run, 2-CPU x86_64), which keeps a path within 2x of its
current cost only for short vectors:

* ECOS counts (K = 50..1000 values per release): OpenDP, via `gaussian_release`, adds 3-76 ms to
  a path whose scoring alone (2,000 samples, 64-dim features, K centroids) takes 8-400 ms, i.e.
  1.2-1.35x the path (less once feature extraction is counted). Callers should use it.
* The SVT's c released values (c = theta_u * |w|, 10^4..10^6): OpenDP would make the upload of a
  10^6-parameter model 33x (theta_u = 0.01) to 107x (theta_u = 0.1) slower, so
  `ecos_flower.dssgd.svt` draws that noise with `laplace` (numpy float64).
  Residual risk, documented here: a released value inside (-gamma, gamma) is a numpy double
  (rounded to float32 on the wire) and may in principle carry Mironov's least-significant-bit
  leak. Mitigations in place: the input is clipped to [-gamma, gamma] before the noise and the
  output clipped after it, the noise scale is far above gamma (almost all released values are
  exactly +-gamma, which carry no low-order bits), and the float32 rounding discards 29 of the 53
  mantissa bits; none of these is a proof (Mironov's snapping mechanism would be).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["NoiseSource"]

Size = int | tuple[int, ...]


def _check_scale(name: str, scale: float) -> float:
    scale = float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{name} must be positive and finite, got {scale}")
    return scale


def _finite_vector(values: Any) -> np.ndarray:
    out = np.array(values, dtype=np.float64, copy=True)
    if not np.all(np.isfinite(out)):
        raise ValueError("a release needs finite values (got NaN or infinity)")
    return out


_OPENDP_CACHE: dict[tuple[str, float], Any] = {}


def _opendp_measurement(kind: str, scale: float) -> Any:
    """OpenDP's vector Laplace / Gaussian measurement at `scale`, built once per (kind, scale)."""
    key = (kind, scale)
    meas = _OPENDP_CACHE.get(key)
    if meas is None:
        import opendp.prelude as dp

        dp.enable_features("contrib")
        domain = dp.vector_domain(dp.atom_domain(T=float, nan=False))
        if kind == "laplace":
            meas = dp.m.make_laplace(domain, dp.l1_distance(T=float), scale=scale)
        else:
            meas = dp.m.make_gaussian(domain, dp.l2_distance(T=float), scale=scale)
        if len(_OPENDP_CACHE) > 64:
            _OPENDP_CACHE.clear()
        _OPENDP_CACHE[key] = meas
    return meas


class NoiseSource:
    """Privacy noise for releases: float64 samples from a CSPRNG-seeded generator."""

    def __init__(self, generator: np.random.Generator) -> None:
        if not isinstance(generator, np.random.Generator):
            raise TypeError(f"NoiseSource needs a numpy Generator, got {type(generator).__name__}")
        self._generator = generator
        self._safe_release = False  # OpenDP samplers for laplace_release / gaussian_release

    @classmethod
    def fresh(cls) -> NoiseSource:
        """A source seeded with 256 bits of OS randomness; releases use OpenDP's samplers."""
        seed = int.from_bytes(secrets.token_bytes(32), "little")
        source = cls(np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))))
        source._safe_release = True
        return source

    @classmethod
    def replayable(cls, seed: int, stream: int) -> NoiseSource:
        """Research runs only: a repeatable source from SeedSequence([seed, stream]); numpy
        samplers everywhere (OpenDP's cannot be replayed)."""
        seq = np.random.SeedSequence([int(seed), int(stream)])
        return cls(np.random.Generator(np.random.PCG64(seq)))

    @property
    def generator(self) -> np.random.Generator:
        """The underlying generator, for code that needs one (permutations, Opacus seeds)."""
        return self._generator

    @property
    def floating_point_safe(self) -> bool:
        """Whether `laplace_release` / `gaussian_release` use OpenDP's floating-point-safe
        samplers (True only for `fresh()` sources)."""
        return self._safe_release

    def laplace(self, scale: float, size: Size) -> np.ndarray:
        """float64 Laplace(0, scale) samples: Exp(1) magnitudes with independent fair signs."""
        scale = _check_scale("scale", scale)
        gen = self._generator
        out = gen.standard_exponential(size)
        n = out.size
        signs = np.unpackbits(np.frombuffer(gen.bytes((n + 7) // 8), dtype=np.uint8))[:n]
        np.negative(out, out=out, where=signs.view(bool).reshape(out.shape))
        out *= scale
        return out

    def gaussian(self, sigma: float, size: Size) -> np.ndarray:
        """float64 N(0, sigma^2) samples."""
        sigma = _check_scale("sigma", sigma)
        out = self._generator.standard_normal(size)
        out *= sigma
        return out

    def laplace_release(self, values: Any, scale: float) -> np.ndarray:
        """values + Laplace(0, scale) noise as float64 (OpenDP's sampler on a fresh source)."""
        return self._release("laplace", values, _check_scale("scale", scale), self.laplace)

    def gaussian_release(self, values: Any, sigma: float) -> np.ndarray:
        """values + N(0, sigma^2) noise as float64 (OpenDP's sampler on a fresh source)."""
        return self._release("gaussian", values, _check_scale("sigma", sigma), self.gaussian)

    def _release(
        self, kind: str, values: Any, scale: float, sample: Callable[[float, Size], np.ndarray]
    ) -> np.ndarray:
        x = _finite_vector(values)
        if self._safe_release and x.size:
            flat = _opendp_measurement(kind, scale)(x.ravel().tolist())
            return np.asarray(flat, dtype=np.float64).reshape(x.shape)
        return x + sample(scale, x.shape)
