import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    # Determinism and speed on the 2-core CI machine.
    torch.set_num_threads(2)
    yield
