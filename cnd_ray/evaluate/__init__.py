"""Sampling-quality and fidelity evaluation, plain PyTorch: metrics, feature extractors, the judge,
the paired comparison. The `cnd-ray evaluate` verb is jobs/evaluate.py."""
