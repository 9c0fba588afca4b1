"""Skin-tone fairness of a classifier, plain PyTorch: per-group AUROC, thresholds, gaps and bootstrap
intervals, and the downstream classifier in the loop. The `cnd-ray fairness` verb is jobs/fairness.py."""
