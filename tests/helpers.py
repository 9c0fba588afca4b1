"""Small builders shared by the tests."""
import torch


def fixed_batch(cfg, n=8, seed=0):
    """A deterministic batch in the config's input shape: {"x", "y"}."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return {"x": x, "y": y}
