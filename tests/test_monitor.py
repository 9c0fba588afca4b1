"""The one AUROC (evaluate.metrics.auroc) against the pairwise definition (ties count half)."""
import math

import numpy as np

from cnd_ray.evaluate.metrics import auroc


def test_auroc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        scores, labels = rng.integers(0, 5, n).astype(float), rng.integers(0, 2, n)
        if labels.min() == labels.max():
            continue
        pos, neg = scores[labels == 1], scores[labels == 0]
        pairwise = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
        assert abs(auroc(labels, scores) - pairwise) < 1e-12
    assert auroc([0, 1], [0.1, 0.9]) == 1.0 and auroc([0, 1], [0.9, 0.1]) == 0.0
    assert math.isnan(auroc([1, 1], [0.3, 0.4]))  # one class only
