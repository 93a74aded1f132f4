"""Prompt -> greedy decoding -> detokenize -> score: a model that writes the right answer scores 100 %,
one that writes a near miss scores 0 (so a 0 % result of a random model is a finding, not a bug)."""

import pytest
import torch
from types import SimpleNamespace

from sala.engine.generation import greedy_generate
from sala.eval.haystack import Haystack
from sala.eval.scoring import sample_score
from sala.eval.tasks import TASKS, generate_samples


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token script (then EOS) whatever the prompt, through the cached-forward interface."""

    def __init__(self, script: list[int], vocab: int, eos: int):
        super().__init__()
        self.script, self.vocab, self.eos = script + [eos], vocab, eos
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        step = 0 if past_key_values is None else past_key_values + (input_ids.shape[1] == 1)
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=step)


@pytest.mark.parametrize("task", list(TASKS))
def test_right_answer_scores_full_and_near_miss_scores_zero(task, corpus_text, tokenizer):
    hay = Haystack(corpus_text, tokenizer)
    (s,) = generate_samples(task, tokenizer, hay, 700, 1, seed=11)
    eos = tokenizer.eos_token_id

    def run(text):
        lm = ScriptedLM(tokenizer(text, add_special_tokens=False)["input_ids"], len(tokenizer), eos)
        gen = greedy_generate(lm, torch.tensor([s.input_ids]), 200, eos_token_ids=[eos], chunk_size=256)
        return sample_score(tokenizer.decode(gen.tokens, skip_special_tokens=True), s.answers)

    assert run(" " + ", ".join(s.answers) + ".") == 1.0
    assert run(" " + " and ".join(a.upper() for a in reversed(s.answers))) == 1.0  # order and case free
    assert run(" " + ", ".join(a + "7" for a in s.answers)) == 0.0  # each answer one character too long
    if len(s.answers) > 1:
        assert run(" " + s.answers[0]) == 1 / len(s.answers)
