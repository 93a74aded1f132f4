"""A small randomly initialised SALA checkpoint with a byte-level tokenizer, for demos and tests.

The folder carries a ``SALA_RANDOM_INIT`` marker file so that every tool can say it is not a trained model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import LIGHTNING, SPARSE, SALAConfig
from .engine.loading import RANDOM_INIT_MARKER

PRESETS = {
    # 6 layers (S L L S L S), group size 16 like the release, sparse path from 512 tokens
    "tiny": dict(
        vocab_size=320, hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=16,
        num_key_value_heads=1, head_dim=16, lightning_nh=16, lightning_nkv=16, lightning_head_dim=16,
        mixer_types=[SPARSE, LIGHTNING, LIGHTNING, SPARSE, LIGHTNING, SPARSE], dim_model_base=64,
        max_position_embeddings=1 << 20,
        sparse_config=dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=128, topk=4,
                           use_nope=False, dense_len=512),
        bos_token_id=1, eos_token_id=[2], pad_token_id=2, initializer_range=0.02,
    ),
}


def byte_tokenizer():
    """A byte-level tokenizer (ids 0-2 special, 3-258 bytes): no download, round-trips any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def write_random_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Create ``out`` with config.json, model.safetensors, a tokenizer and the random-init marker."""
    from .modeling import SALAForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = SALAForCausalLM(SALAConfig(**PRESETS[preset]))
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    (out / RANDOM_INIT_MARKER).write_text("This checkpoint has random weights: it is for demos and tests only.\n")
    return out
