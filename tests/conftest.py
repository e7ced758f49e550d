import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values, so parity tests compare more than zero heads."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model
