"""cnd_ray: Class-N-Diff (classification-induced diffusion) trained at scale with Ray.

Importing the package does nothing (house rule 9); the core lives in plain-PyTorch modules
(`config`, `models`, `diffusion`, `objective`, `engine`, `checkpoint`) that need neither Ray nor
MLflow.
"""
__version__ = "0.1.0"
