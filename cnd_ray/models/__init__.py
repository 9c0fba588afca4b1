"""Architectures only: the DiT denoiser and the benign/malignant classifier (plain PyTorch)."""
from cnd_ray.models.classifier import Classifier, build_classifier
from cnd_ray.models.dit import DiT, SIZES, build_dit

__all__ = ["DiT", "SIZES", "build_dit", "Classifier", "build_classifier"]
