"""Small random SALA models for tests and examples (no download, seconds on a CPU)."""

from __future__ import annotations

import torch

from .config import SALAConfig
from .modeling import SALAForCausalLM


def small_config(**kw) -> SALAConfig:
    base = dict(
        vocab_size=97, hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, lightning_nkv=6,
        mixer_types=["lightning", "minicpm4", "lightning", "minicpm4"], dim_model_base=32,
        sparse_config=dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=64, topk=2,
                           dense_len=4096),
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=[2], pad_token_id=0, initializer_range=0.05,
    )
    base.update(kw)
    return SALAConfig(**base)


def make_model(cfg: SALAConfig, seed: int = 0) -> SALAForCausalLM:
    torch.manual_seed(seed)
    model = SALAForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a skipped weight would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.6, 1.4)
    return model


def random_ids(cfg, B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, cfg.vocab_size, (B, T), generator=g)
