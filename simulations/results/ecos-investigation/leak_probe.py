"""Embedded scenario: the 3 non-client styles are the same 1,797 source digits, so a pool sample
can be a restyled copy of a client's test digit. Count, per selection, the share of client test
digits whose source image is selected (in any style)."""
import numpy as np
from ecos_flower.data import load_federation
from ecos_flower.data.federation import split_fraction, derive_seed
from ecos_flower.ecos import (EcosSampler, KCenterSampler, RandomSampler, InDomainSampler, compress,
                              coverage_scores, aggregate_scores, make_extractor)
fed = load_federation("simulations/embedded.toml")
sc = fed.scenario
n = 1797
public_idx, private_idx = split_fraction(np.arange(n), sc.share, derive_seed(sc.seed, 1))
# pool source ids in concat order
src = []
for name in sc.pool_domains:
    src.append(public_idx if name == sc.client_domain else np.arange(n))
src = np.concatenate(src)
assert len(src) == len(fed.pool)
# client test sources: anything private not in train is test; test = private minus train parts; simpler: private set
priv = set(private_idx.tolist())
dom = fed.pool.domains.numpy(); cid = fed.pool.domain_names.index(sc.client_domain)
print("pool", len(src), "private sources (client train+test):", len(priv))
for seed in (0, 1):
    ex = make_extractor("random", seed=seed).fit(fed.pool.images, fed.pool.labels)
    f = ex.transform(fed.pool.images, progress=False)
    comp = compress(f, 50, seed=seed)
    true = np.sum([coverage_scores(ex.transform(c.train.images, progress=False), comp.centroids) for c in fed.clients], axis=0)
    samplers = {"oracle": EcosSampler(f, comp, aggregate_scores([true], 0.0, 0.0), seed=seed),
                "kcenter": KCenterSampler(f, seed=seed), "random": RandomSampler(len(src), seed=seed),
                "in-domain": InDomainSampler(dom, cid, seed=seed)}
    for B in (500, 1000):
        for name, s in samplers.items():
            sel = s.select(B)
            srcs = src[sel]
            cover = np.mean([x in set(srcs.tolist()) for x in private_idx])
            print(f"seed {seed} B={B} {name:9s} distinct sources {len(set(srcs.tolist())):4d}  "
                  f"share of clients' private digits present in another style {cover:.3f}")
