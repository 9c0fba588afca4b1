import pytest
import torch

from cnd_ray import config as config_lib


@pytest.fixture(autouse=True)
def _threads():
    # Determinism and speed on the 2-core CI machine.
    torch.set_num_threads(2)
    yield


@pytest.fixture
def debug_cfg():
    return config_lib.load("debug")


def fixed_batch(cfg, n=8, seed=0):
    """A deterministic batch in the config's input shape: {"x", "y"}."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return {"x": x, "y": y}
