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


def test_a_training_grid_is_drawn_by_the_generation_path():
    """The grid's tiles are the images `cnd-ray sample` draws for the same seeds (one path for
    grids and generation), the same at every call."""
    import torch

    from cnd_ray import config as C, generate, monitor
    from cnd_ray.engine import build_state

    state = build_state(C.load("debug", ["diffusion.sample_steps=2"]))
    s = state.cfg.data.image_size
    grid = monitor.sample_grid(state, per_class=3, seed=7)
    assert grid.shape == (2 * s, 3 * s, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid, monitor.sample_grid(state, per_class=3, seed=7))
    rows = generate.plan(6, [1.0, 1.0], 7, 6)
    images = generate.Generator(monitor.search_config(state.cfg), state.ema)(rows["seed"], rows["label"], rows["tone"])
    first = np.flatnonzero(rows["label"] == 1)[0]  # the first malignant image: row 1, column 0
    assert torch.equal(torch.from_numpy(grid[s:2 * s, :s]).permute(2, 0, 1), images[first])
