"""Selection-only probe: ECOS domain precision for extractor / K / threshold-multiple, with
client noise simulated as the ClientApp does (analytic Gaussian, eps=1, delta=1e-5, sens 1).
No cloud training. Noise: 3 independent draws per setting."""
import sys, json
import numpy as np
from ecos_flower.data import load_federation
from ecos_flower.ecos import (EcosSampler, compress, coverage_scores, aggregate_scores,
                              domain_precision, make_extractor)
from ecos_flower.privacy import analytic_gaussian_sigma
scenario, extractors = sys.argv[1], sys.argv[2].split(",")
ks = [int(k) for k in sys.argv[3].split(",")]
thresholds = [float(t) for t in sys.argv[4].split(",")]
budgets = [int(b) for b in sys.argv[5].split(",")]
seeds = int(sys.argv[6])
fed = load_federation(scenario); pool = fed.pool; dom = pool.domains.numpy()
cid = pool.domain_names.index(fed.client_domain)
sigma = analytic_gaussian_sigma(1.0, 1e-5, 1.0)
print(f"# pool {len(pool)}, in-domain {(dom == cid).sum()}, client train sizes {[len(c.train) for c in fed.clients]}, sigma {sigma:.3f}")
for kind in extractors:
    for seed in range(seeds):
        kw = {"epochs": 5} if kind == "supervised" else ({"n_components": 64} if kind == "pca" else {})
        ex = make_extractor(kind, seed=seed, **kw).fit(pool.images, pool.labels)
        feats = ex.transform(pool.images, progress=False)
        cf = [ex.transform(c.train.images, progress=False) for c in fed.clients]
        for k in ks:
            comp = compress(feats, k, seed=seed)
            true = [coverage_scores(f, comp.centroids) for f in cf]
            o = EcosSampler(feats, comp, aggregate_scores(true, 0.0, 0.0), seed=seed)
            for thr in thresholds:
                for b in budgets:
                    precs, kept = [], []
                    for draw in range(3):
                        rng = np.random.default_rng(100 * seed + draw)
                        noisy = [t + rng.normal(0, sigma, t.shape) for t in true]
                        agg = aggregate_scores(noisy, sigma, thr, cluster_sizes=comp.cluster_sizes)
                        precs.append(domain_precision(EcosSampler(feats, comp, agg, seed=seed).select(b), dom, cid))
                        kept.append(int((agg > 0).sum()))
                    print(json.dumps(dict(ex=kind, seed=seed, K=k, thr=thr, B=b, prec=round(float(np.mean(precs)), 3),
                        prec_min=round(float(np.min(precs)), 3),
                        oracle=round(domain_precision(o.select(b), dom, cid), 3), kept=float(np.mean(kept)),
                        true_nonzero=int((np.sum(true, 0) > 0).sum()))), flush=True)
