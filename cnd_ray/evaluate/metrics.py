"""Sample-quality numbers on features and pixels: FID, KID, MS-SSIM diversity, memorisation, PCA, AUROC."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as pytorch_msssim
MS_SSIM_WIN, MS_SSIM_SIGMA, MS_SSIM_K = 11, 1.5, (0.01, 0.03)
DATA_RANGE = 255.0


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted (float64) to two feature sets (N, D), (M, D)."""
    from cleanfid.fid import frechet_distance  # lazy: cleanfid pulls torchvision in (house rule 9)

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with warnings.catch_warnings():  # clean-fid 0.1.35 passes sqrtm's deprecated `disp`: not ours to fix
        warnings.filterwarnings("ignore", "The `disp` argument", DeprecationWarning)
        # clean-fid's own frechet_distance, so our FID is theirs given the same features
        return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance of `fid`, computed without a (D, D) matrix square root: with centred
    rows A (N, D) and B (M, D), tr sqrt(S_a S_b) = ||A B^T||_* / sqrt((N - 1)(M - 1)) (the nuclear
    norm: the singular values of an N x M matrix). Exact for any sizes and ~1000x faster than sqrtm
    when min(N, M) << D, as for a few hundred samples in a 512-d space: what the in-training metrics
    and their bootstrap intervals need (with more samples than D it is `fid` itself). Where sqrtm is
    well conditioned both agree (tested); on the singular products of fewer samples than D it is
    not, and this is the one to trust."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) > a.shape[1]:  # then the (D, D) route is the cheaper one
        return fid(a, b)
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    mean = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    return float(mean + np.sum(ca * ca) / na + np.sum(cb * cb) / nb - 2 * cross)


def kid(a, b, subsets: int, subset_size: int, seed: int = 0) -> tuple[float, float]:
    """KID as cleanfid.fid.kernel_distance (cubic kernel, unbiased MMD^2), seeded; (mean, std over subsets)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a.shape[1]
    m = min(len(a), len(b), subset_size)
    rng = np.random.default_rng(seed)  # our own stream: clean-fid draws from the global np.random
    values = []
    for _ in range(subsets):
        # b before a: clean-fid's draw order, so the same stream gives clean-fid's subsets
        x = b[rng.choice(len(b), m, replace=False)]  # (m, D)
        y = a[rng.choice(len(a), m, replace=False)]  # (m, D)
        k = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3  # (m, m)
        kxy = (x @ y.T / d + 1) ** 3  # (m, m)
        values.append(((k.sum() - np.diag(k).sum()) / (m - 1) - kxy.sum() * 2 / m) / m)
    # std with ddof=0, as torch-fidelity reports KID's spread
    return float(np.mean(values)), float(np.std(values))


def ms_ssim_scales(size: int, win: int = MS_SSIM_WIN) -> int:
    """Largest number of scales s in 1..5 whose coarsest image (size / 2^(s-1)) still fits the window."""
    return max([s for s in range(1, len(MS_SSIM_WEIGHTS) + 1) if size / 2 ** (s - 1) >= win] or [1])


def ms_ssim_protocol(size: int) -> dict:
    """Window, sigma, scales and weights that ms_ssim uses on images whose smaller side is `size`."""
    window = MS_SSIM_WIN if size >= MS_SSIM_WIN else max(1, size - (1 - size % 2))  # largest odd <= size
    scales = ms_ssim_scales(size, window)
    w = np.asarray(MS_SSIM_WEIGHTS[:scales], np.float64)
    # all five as published (they sum to 1.0001); fewer are renormalised so the product stays in [0, 1]
    weights = list(MS_SSIM_WEIGHTS) if scales == len(MS_SSIM_WEIGHTS) else (w / w.sum()).tolist()
    return {"window": window, "sigma": MS_SSIM_SIGMA, "scales": scales, "weights": weights,
            "k1": MS_SSIM_K[0], "k2": MS_SSIM_K[1], "data_range": DATA_RANGE}


def _gauss_filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each map, valid (no padding): the map shrinks by window - 1."""
    def band(n: int) -> torch.Tensor:
        # (n, n - k + 1) Toeplitz matrix: a matmul is the valid convolution, and float64 matmuls are
        # about twice as fast on CPU as float64 depthwise conv2d at 32-64 px
        out = torch.arange(n - len(g) + 1, device=x.device)
        m = torch.zeros(n, len(out), dtype=x.dtype, device=x.device)
        m[out[:, None] + torch.arange(len(g), device=x.device), out[:, None]] = g
        return m

    return band(x.shape[-2]).T @ x @ band(x.shape[-1])  # (N, C, h - k + 1, w - k + 1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pair MS-SSIM (N,) float64 of uint8 / [0, 255] images (N, 3, H, W); scales per ms_ssim_protocol.

    As pytorch_msssim: contrast-structure at the lower scales, full SSIM at the last, relu before the
    weighted product, per channel then averaged. Images smaller than 161 px keep only the scales whose
    coarsest side is >= 11 (weights renormalised to sum to 1); below 11 px the window itself shrinks
    to the largest odd size <= the side (sigma stays 1.5), a single-scale SSIM.
    """
    assert x.shape == y.shape and x.dim() == 4, (x.shape, y.shape)
    proto = ms_ssim_protocol(min(x.shape[-2:]))
    x, y = x.to(torch.float64), y.to(torch.float64)
    # window built and normalised in float32 as pytorch_msssim builds it (moves values by ~1e-7):
    # then our float64 result is bit-for-bit theirs on float64 input
    coords = torch.arange(proto["window"], dtype=torch.float32) - proto["window"] // 2
    g = torch.exp(-coords ** 2 / (2 * proto["sigma"] ** 2))
    g = (g / g.sum()).to(x.device, torch.float64)  # (win,)
    c1, c2 = (proto["k1"] * DATA_RANGE) ** 2, (proto["k2"] * DATA_RANGE) ** 2
    weights = torch.tensor(proto["weights"], dtype=torch.float64, device=x.device)
    values = []
    for i in range(proto["scales"]):
        # the five local moments in one filtering call: a fifth of the calls on small images
        mu_x, mu_y, xx, yy, xy = _gauss_filter(torch.cat([x, y, x * x, y * y, x * y], 1), g).chunk(5, 1)
        var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y  # (N, C, h, w)
        cs = (2 * cov + c2) / (var_x + var_y + c2)  # (N, C, h, w)
        if i < proto["scales"] - 1:
            values.append(torch.relu(cs.flatten(2).mean(-1)))  # (N, C)
            # odd sides pad by one (counted as zeros), as pytorch_msssim does, for parity with it
            pad = [s % 2 for s in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
        else:
            lum = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
            values.append(torch.relu((lum * cs).flatten(2).mean(-1)))  # (N, C)
    stacked = torch.stack(values)  # (S, N, C)
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0).mean(1)  # (N,)


def lesion_contrast(images: torch.Tensor) -> np.ndarray:
    """(N,) how much darker each uint8 image's (N, 3, S, S) centre is than its skin, as a share of the
    skin's luminance (Weber contrast, so that a lesion on dark skin counts as much as one on light
    skin): skin = the median luminance of a ring 0.5-0.85 of the half-width from the centre (inside a
    dermoscope's dark corners), centre = the darkest spot (a box of ~S/10 px) within 0.4 of it.
    Dermoscopic images centre their lesion (ISIC's and the synthetic set's do), so an image that shows
    one scores about as high as the real images of its class, and plain skin or a faint smudge near 0.
    Read it beside FD: a dark speckle in a noisy texture passes too (an untrained model's noise scores
    ~0.8 where its FD is 27x the floor)."""
    x = images.float()
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (N, S, S), Rec. 601 luma, 0-255
    s = lum.shape[-1]
    k = max(3, round(s / 10)) | 1  # odd: the box is centred on its pixel
    spot = F.avg_pool2d(lum[:, None], k, stride=1, padding=k // 2, count_include_pad=False)[:, 0]
    c = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    r = torch.hypot(c[:, None], c[None, :])  # (S, S) distance from the centre, half-widths
    ring = lum[:, (r > 0.5) & (r < 0.85)].median(dim=1).values
    return ((ring - spot[:, r < 0.4].min(dim=1).values) / ring.clamp(min=1.0)).numpy()


def diversity(images: torch.Tensor, labels: np.ndarray, pairs: int, seed: int = 0,
              batch: int = 64) -> dict:
    """Mean MS-SSIM over `pairs` random same-class pairs (i != j) per class; lower = more diverse."""
    labels = np.asarray(labels)
    per_class, every = {}, []
    for label in np.unique(labels).tolist():
        idx = np.flatnonzero(labels == label)
        if len(idx) < 2:
            per_class[int(label)] = {"ms_ssim": None, "pairs": 0, "images": len(idx)}
            continue
        # one stream per class: a class's pairs do not move when another class is added or dropped
        rng = np.random.default_rng([seed, int(label)])
        i = rng.integers(len(idx), size=pairs)
        j = rng.integers(len(idx) - 1, size=pairs)
        j = j + (j >= i)  # uniform over the other images, never i itself
        vals = [ms_ssim(images[idx[i[k:k + batch]]], images[idx[j[k:k + batch]]]).cpu().numpy()
                for k in range(0, pairs, batch)]
        vals = np.concatenate(vals)  # (pairs,)
        per_class[int(label)] = {"ms_ssim": float(vals.mean()), "pairs": pairs, "images": len(idx)}
        every.append(vals)
    every = np.concatenate(every) if every else np.zeros(0)
    return {"per_class": per_class,
            "all": {"ms_ssim": float(every.mean()) if len(every) else None, "pairs": len(every)}}


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (one copy of a 58k x 2048 set is 475 MB); zero rows stay zero."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _nearest(q: np.ndarray, ref: np.ndarray, batch: int, skip_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest `ref` row to each `q` row (both unit): (distance (N,), index (N,)), `batch` rows at a time."""
    dist, index = np.empty(len(q)), np.empty(len(q), np.int64)
    for s in range(0, len(q), batch):
        sim = q[s:s + batch] @ ref.T  # (B, M): only this chunk of the full matrix lives at once
        if skip_self:
            sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf
        k = sim.argmax(1)  # unit rows: max cosine = min L2
        index[s:s + batch] = k
        # the distance itself from the two rows in float64, not from 2 - 2 cos (cancellation near 0)
        dist[s:s + batch] = np.linalg.norm(q[s:s + batch].astype(np.float64) - ref[k], axis=1)
    return dist, index


def memorisation(gen: np.ndarray, train: np.ndarray, heldout: np.ndarray, quantile: float,
                 batch: int = 1024) -> dict:
    """Samples' nearest-training-row distances (unit rows), share under a calibrated threshold, duplicates."""
    gen, train, heldout = _unit(gen), _unit(train), _unit(heldout)
    dist, index = _nearest(gen, train, batch)
    # calibrated: real images the model never saw fall under it at rate `quantile`
    threshold = float(np.quantile(_nearest(heldout, train, batch)[0], quantile))
    dup = _nearest(gen, gen, batch, skip_self=True)[0] if len(gen) > 1 else np.full(len(gen), np.inf)
    # "at or under" so that a zero threshold (held-out rows copied in train) still counts exact copies
    return {"nn_distance": dist, "threshold": threshold, "share_under": float(np.mean(dist <= threshold)),
            "expected_share": quantile, "duplicate_rate": float(np.mean(dup <= threshold)), "nn_index": index}


def pca_plot(real: np.ndarray, real_labels, gen: np.ndarray, gen_labels, path,
             class_names=("benign", "malignant"), title: str = "") -> dict:
    """Scatter PNG of real and generated features on the real features' first two principal axes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    real, gen = np.asarray(real, np.float64), np.asarray(gen, np.float64)
    real_labels, gen_labels = np.asarray(real_labels), np.asarray(gen_labels)
    mean = real.mean(0)
    centred = real - mean  # (N, D)
    # SVD of the (D, D) scatter matrix: same axes as the SVD of the centred rows, cheap for N >> D
    _, var, vt = np.linalg.svd(centred.T @ centred, hermitian=True)
    axes = vt[:2] * np.sign(vt[:2, [0]] + (vt[:2, [0]] == 0))  # (2, D), sign fixed: stable plots
    ratio = (var[:2] / var.sum()).tolist()
    rng = np.random.default_rng(0)  # subsampling is for drawing only
    fig, ax = plt.subplots(figsize=(7, 6))
    for kind, feats, labs, marker in (("real", real, real_labels, "."), ("generated", gen, gen_labels, "x")):
        proj = (feats - mean) @ axes.T  # (N, 2)
        for c, label in enumerate(np.unique(np.concatenate([real_labels, gen_labels])).tolist()):
            idx = np.flatnonzero(labs == label)
            if len(idx) == 0:
                continue
            name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(label)
            text = f"{kind} {name} (n={len(idx)})"
            if len(idx) > 5000:  # a scatter of 50k points is one blob and a slow file
                idx = np.sort(rng.choice(idx, 5000, replace=False))
                text += ", 5000 drawn"
            ax.scatter(proj[idx, 0], proj[idx, 1], s=4 if kind == "real" else 12, marker=marker,
                       color=f"C{c}", alpha=0.5, linewidths=0.8, label=text)
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of real variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of real variance)")
    ax.set_title(title)
    ax.legend(markerscale=2, fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"explained_variance": ratio, "path": str(path)}


def auroc(y, score) -> float:
    """Area under the ROC curve of scores `score` for binary labels `y` (sklearn's order), as the
    Mann-Whitney statistic: a tied positive-negative pair counts half; nan without both classes.
    The project's one AUROC: training's val AUROC, class fidelity and the fairness report use it."""
    scores, labels = np.asarray(score, np.float64), np.asarray(y).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties averaged
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def classification(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.0) -> dict:
    """Class fidelity of logits: AUROC, accuracy at `threshold`, accuracy per true class, count."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(int)
    correct = (scores > threshold) == labels.astype(bool)  # (N,)
    return {"auroc": auroc(labels, scores), "accuracy": float(correct.mean()),
            "per_class_accuracy": {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)},
            "n": len(labels)}
