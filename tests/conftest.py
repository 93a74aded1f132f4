"""Shared fixtures: the released reference's outputs on a tiny random checkpoint (tests/fixtures), and offline
real text with a tokenizer trained on it and tiny random causal LMs (a Llama and a SALA hybrid)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA (CI), Triton kernels run through the interpreter. TRITON_INTERPRET must be set before
# triton.language is first imported (``import sala`` imports it, through torch): a test module that sets
# it itself is too late once any earlier-collected module imported sala, so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "minicpm_sala_tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def cases() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURE_DIR / "cases.safetensors"))


@pytest.fixture(scope="session")
def tiny_model():
    import sala  # noqa: F401
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(FIXTURE_DIR)).eval()


# ---- real text, a BPE tokenizer trained on it in-test, tiny random causal LMs (eval and engine tests)

DATA = Path(__file__).parent / "eval" / "data"
EXCERPT = DATA / "shakespeare_excerpt.txt"  # public-domain text (As You Like It, Gutenberg edition)


def train_tokenizer(text: str, vocab_size: int = 400):
    from sala.testing import train_bpe_tokenizer

    return train_bpe_tokenizer(text, vocab_size)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return EXCERPT.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tokenizer(corpus_text):
    return train_tokenizer(corpus_text)


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_sala(vocab_size: int, seed: int = 0):
    """A 4-layer hybrid (lightning, sparse, lightning, sparse) whose sparse path engages from 256 tokens;
    it refuses contexts past 1024 tokens (max_position_embeddings)."""
    from sala.testing import make_model, small_config

    cfg = small_config(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=12, lightning_nkv=4, max_position_embeddings=1024,
                       sparse_config=dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64,
                                          window_size=64, topk=2, dense_len=256), pad_token_id=2)
    return make_model(cfg, seed)


@pytest.fixture(scope="session")
def builders():
    """{'llama': tiny_llama, 'sala': tiny_sala}: build a tiny random model for a vocabulary size and seed."""
    return {"llama": tiny_llama, "sala": tiny_sala}
