"""ECOS core: features, compression, coverage scores, aggregation, allocation and samplers."""

from ecos_flower.ecos.aggregate import (
    DEFAULT_THRESHOLD_MULTIPLE,
    aggregate_noise_std,
    aggregate_scores,
)
from ecos_flower.ecos.allocation import allocate_budget
from ecos_flower.ecos.compress import Compression, compress, suggest_num_clusters
from ecos_flower.ecos.extractor_base import FeatureExtractor, l2_normalise
from ecos_flower.ecos.features import (
    EXTRACTOR_KINDS,
    PCAExtractor,
    RandomCNNExtractor,
    SupervisedCNNExtractor,
    cached_features,
    extractor_from_arrays,
    make_extractor,
)
from ecos_flower.ecos.kcenter import greedy_k_center
from ecos_flower.ecos.pretrained import TorchvisionExtractor
from ecos_flower.ecos.samplers import (
    EcosSampler,
    InDomainSampler,
    KCenterSampler,
    OracleSampler,
    RandomSampler,
    domain_precision,
)
from ecos_flower.ecos.scoring import SCORE_MODES, coverage_scores, score_sensitivity

__all__ = [
    "DEFAULT_THRESHOLD_MULTIPLE",
    "EXTRACTOR_KINDS",
    "SCORE_MODES",
    "Compression",
    "EcosSampler",
    "FeatureExtractor",
    "InDomainSampler",
    "KCenterSampler",
    "OracleSampler",
    "PCAExtractor",
    "RandomCNNExtractor",
    "RandomSampler",
    "SupervisedCNNExtractor",
    "TorchvisionExtractor",
    "aggregate_noise_std",
    "aggregate_scores",
    "allocate_budget",
    "cached_features",
    "compress",
    "coverage_scores",
    "domain_precision",
    "extractor_from_arrays",
    "greedy_k_center",
    "l2_normalise",
    "make_extractor",
    "score_sensitivity",
    "suggest_num_clusters",
]
