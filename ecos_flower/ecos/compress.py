"""Server-side compression of the public pool's features into K-means centroids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Compression:
    """K-means summary of the pool: centroids (K, d) float32, per-sample cluster, cluster sizes."""

    centroids: np.ndarray
    assignments: np.ndarray
    cluster_sizes: np.ndarray

    @property
    def num_clusters(self) -> int:
        """K."""
        return int(self.centroids.shape[0])

    def members(self, cluster: int) -> np.ndarray:
        """Pool indices assigned to `cluster`."""
        return np.flatnonzero(self.assignments == cluster)


def check_features(features: np.ndarray, name: str = "features") -> np.ndarray:
    """`features` as a C-contiguous float32 (n, d) array; ValueError if not 2-D or not finite."""
    array = np.ascontiguousarray(features, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def compress(
    features: np.ndarray,
    k: int,
    seed: int = 0,
    minibatch_threshold: int = 20000,
    *,
    n_init: int = 3,
    max_iter: int = 100,
) -> Compression:
    """K-means (scikit-learn `KMeans`, or `MiniBatchKMeans` above `minibatch_threshold` samples).

    Only the centroids go to clients; the assignments stay on the server for decompression.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    data = check_features(features)
    n = data.shape[0]
    if not isinstance(k, int | np.integer) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} clusters but only {n} samples")
    if n_init <= 0 or max_iter <= 0:
        raise ValueError("n_init and max_iter must be positive")
    if n > minibatch_threshold:
        model = MiniBatchKMeans(
            n_clusters=int(k),
            n_init=n_init,
            max_iter=max_iter,
            random_state=seed,
            batch_size=max(1024, 4 * int(k)),
        )
    else:
        model = KMeans(n_clusters=int(k), n_init=n_init, max_iter=max_iter, random_state=seed)
    model.fit(data)
    centroids = np.ascontiguousarray(model.cluster_centers_, dtype=np.float32)
    assignments = np.asarray(model.predict(data), dtype=np.int64)
    sizes = np.bincount(assignments, minlength=int(k)).astype(np.int64)
    return Compression(centroids=centroids, assignments=assignments, cluster_sizes=sizes)


def suggest_num_clusters(
    client_samples: int,
    noise_std: float,
    pool_size: int,
    *,
    signal_to_noise: float = 4.0,
    min_k: int = 2,
    max_k: int = 1000,
) -> int:
    """K so that a cluster holding 1/K of the clients' data stands `signal_to_noise` x above the
    aggregate noise std: K = client_samples / (signal_to_noise * noise_std), clamped to
    [min_k, min(max_k, pool_size)]. `client_samples` is the (approximate, public) total number
    of samples of the answering clients; small clients get few, coarse clusters."""
    if client_samples <= 0 or pool_size <= 0:
        raise ValueError("client_samples and pool_size must be positive")
    if not np.isfinite(noise_std) or noise_std < 0 or signal_to_noise <= 0:
        raise ValueError("noise_std must be finite and >= 0, signal_to_noise > 0")
    if min_k < 1 or max_k < min_k:
        raise ValueError(f"need 1 <= min_k <= max_k, got {min_k}, {max_k}")
    upper = min(max_k, pool_size)
    if noise_std == 0:
        return int(upper)
    k = int(client_samples / (signal_to_noise * noise_std))
    return int(min(max(k, min_k), upper))
