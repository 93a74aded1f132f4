"""The served model: loading, prompt encoding, length checks, and one worker thread that runs requests.

The model runs one request at a time: a single-thread executor is the lock and its FIFO is the queue, so
requests wait their turn in arrival order and the event loop stays free for new connections meanwhile.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from .generation import eos_ids
from .graphs import apply_decode_graphs, check_decode_graphs_mode
from .loading import is_random_init, load_model
from .decoding import SamplingParams, Summary, generate_text
from .protocol import RequestError

DEFAULT_MAX_TOKENS = 256


class Engine:
    def __init__(self, model, tokenizer, name: str, chunk_size: int | None = 8192,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, random_init: bool = False):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.chunk_size = chunk_size
        self.default_max_tokens = default_max_tokens
        self.random_init = random_init
        self.max_context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.eos_ids = eos_ids(model, tokenizer)
        self.created = int(time.time())
        self.waiting = 0  # requests submitted and not finished (the running one included)
        self._count_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sala-engine")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto", name: str | None = None,
             chunk_size: int | None = 8192, decode_graphs: str = "auto", **kw) -> "Engine":
        """Model and tokenizer from a checkpoint folder; the served name defaults to the folder's name.
        ``decode_graphs``: see ``sala.engine.graphs.apply_decode_graphs``."""
        check_decode_graphs_mode(decode_graphs)  # before the model loads
        path = Path(path)
        model, tok = load_model(path, device, dtype)
        apply_decode_graphs(model, decode_graphs)
        return cls(model, tok, name or path.resolve().name, chunk_size, random_init=is_random_init(path), **kw)

    # ---- prompts
    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise RequestError("prompt encodes to no tokens", "prompt")
        return list(ids)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"model {self.name!r} has no chat template in its tokenizer: "
                               "use /v1/completions with a plain prompt", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template itself raises on conversations it does not accept
            raise RequestError(f"messages rejected by the chat template: {e}", "messages") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError("messages render to no tokens", "messages")
        return list(ids)

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise RequestError(f"model {requested!r} is not served here; this server serves {self.name!r}",
                               "model", status=404, code="model_not_found")

    def max_tokens_for(self, n_prompt: int, max_tokens: int | None, prompt_field: str = "prompt") -> int:
        """``max_tokens`` (or the default) checked against the room the context leaves after the prompt."""
        ctx = self.max_context
        if ctx is not None and n_prompt > ctx:
            raise RequestError(f"{prompt_field} has {n_prompt} tokens, more than the model's context of {ctx} "
                               "(max_position_embeddings)", prompt_field)
        room = None if ctx is None else ctx - n_prompt
        if max_tokens is None:
            if room is not None and room < 1:
                raise RequestError(f"{prompt_field} has {n_prompt} tokens and fills the model's context of {ctx}: "
                                   "no room to generate", prompt_field)
            return self.default_max_tokens if room is None else min(self.default_max_tokens, room)
        if room is not None and max_tokens > room:
            raise RequestError(f"max_tokens {max_tokens} goes beyond the context: the prompt has {n_prompt} tokens "
                               f"and the model's context is {ctx}, leaving room for {max(room, 0)}", "max_tokens")
        return max_tokens

    # ---- running
    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 cancelled: Callable[[], bool] | None = None) -> Iterator[str | Summary]:
        """Text deltas then a ``Summary``; call it from the worker thread only (see ``submit``)."""
        yield from generate_text(self.model, self.tokenizer, prompt_ids, params, self.eos_ids, self.chunk_size,
                                 cancelled)

    def submit(self, job: Callable[[], None]) -> Future:
        """Queue ``job`` behind the requests already waiting; it runs alone on the model."""
        with self._count_lock:
            self.waiting += 1

        def run():
            try:
                job()
            finally:
                with self._count_lock:
                    self.waiting -= 1

        return self._worker.submit(run)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
