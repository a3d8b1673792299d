import pytest
import torch

from limoe.config import get_config
from limoe.model import LIMoE


@pytest.fixture
def tiny_cfg():
    return get_config("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return LIMoE(tiny_cfg).eval()


def random_batch(cfg, n, seed=0):
    """n random images and n random texts of varied length (padding after <eos>)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(3, cfg.vocab_size, (n, cfg.context_length), generator=g)
    for i in range(n):
        length = 2 + i % (cfg.context_length - 1)
        tokens[i, length:] = cfg.pad_id
    return images, tokens
