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


def train_bpe_tokenizer(text: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on ``text`` (offline tests that need a real tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
