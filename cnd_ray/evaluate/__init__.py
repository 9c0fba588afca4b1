"""Sampling-quality and fidelity evaluation (issue 6)."""
