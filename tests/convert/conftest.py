"""Tiny random teachers built in-test (no downloads)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(layers=4, heads=4, kv=2, hidden=32, tie=False, seed=0, vocab=97, theta=5000.0, eps=1e-5):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, rope_theta=theta, rms_norm_eps=eps,
        max_position_embeddings=256, tie_word_embeddings=tie, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # norms away from 1 so that copying them is tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def llama_factory():
    return tiny_llama
