"""Skin-tone fairness of a classifier: per-group AUROC, thresholds, gaps and bootstrap intervals (issue 8)."""
