"""The hybrid cache: K/V plus compressed keys for sparse layers, a recurrent state for lightning layers.

Sparse layers keep, per sequence, only the real (unpadded) tokens in growing buffers (1.25x, or sized up
front by ``SALACache.reserve``) laid out ``[T, Hk, D]`` (the ops' layout), so a decode step appends in place
and reads a contiguous prefix; the compressed keys K1/K2 are kept incrementally and only once the sparse
path is first used (the release compresses the whole history at the first sparse step, then incrementally:
the same values).
Lightning layers keep one float32 state ``[B, H, K, V]``.

``SALACache`` subclasses transformers' ``Cache`` so that ``generate()`` accepts it; it overrides every
method generation relies on rather than depending on the base class internals.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .config import LIGHTNING, SALAConfig
from .ops.infllmv2_reference import compress_keys, n_compressed


GROWTH = 1.25  # capacity factor when a buffer fills: at 1M tokens doubling would hold up to 2x the K/V
ALIGN = 256  # capacities are multiples of this many tokens


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _GrowBuffer:
    """A ``[T, ...]`` tensor that grows by ``GROWTH`` (or to a reserved size); ``view()`` is the filled prefix.

    Growth copies the filled prefix once; ``reserve`` sizes the buffer for a known total length up front, so a
    long prefill followed by decoding holds exactly what it needs.
    """

    def __init__(self, chunk: torch.Tensor, min_capacity: int = ALIGN):
        cap = max(min_capacity, chunk.shape[0])
        self.data = chunk.new_empty(cap, *chunk.shape[1:])
        self.length = 0
        self.append(chunk)

    def _resize(self, cap: int) -> None:
        grown = self.data.new_empty(cap, *self.data.shape[1:])
        grown[: self.length] = self.data[: self.length]
        self.data = grown

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` rows in total (never shrinks below what is filled)."""
        if capacity > self.data.shape[0]:
            self._resize(capacity)

    def append(self, chunk: torch.Tensor) -> None:
        need = self.length + chunk.shape[0]
        if need > self.data.shape[0]:
            self._resize(max(need, _aligned(int(self.data.shape[0] * GROWTH))))
        self.data[self.length : need] = chunk
        self.length = need

    def view(self) -> torch.Tensor:
        return self.data[: self.length]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def clone(self) -> _GrowBuffer:
        new = object.__new__(_GrowBuffer)
        new.data, new.length = self.data.clone(), self.length
        return new


class SparseLayerCache:
    """Per-sequence K/V of real tokens and the compressed keys of one sparse layer."""

    is_sliding = False
    is_compileable = False

    def __init__(self, kernel_size: int, kernel_stride: int):
        self.kernel_size, self.kernel_stride = kernel_size, kernel_stride
        self.keys: list[_GrowBuffer | None] = []
        self.values: list[_GrowBuffer | None] = []
        self.k1: list[_GrowBuffer | None] = []
        self.k2: list[_GrowBuffer | None] = []
        self.reserved = 0  # tokens per sequence to allocate up front (SALACache.reserve)

    def _ensure(self, batch: int) -> None:
        if not self.keys:
            self.keys, self.values = [None] * batch, [None] * batch
            self.k1, self.k2 = [None] * batch, [None] * batch
        elif len(self.keys) != batch:
            raise ValueError(f"cache holds {len(self.keys)} sequences but the input has batch size {batch}")

    def update(self, b: int, batch: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append real tokens k/v ``[t, Hk, D]`` of sequence b; return all its keys and values."""
        self._ensure(batch)
        if self.keys[b] is None:
            cap = max(ALIGN, self.reserved)
            self.keys[b], self.values[b] = _GrowBuffer(k, cap), _GrowBuffer(v, cap)
        elif k.shape[0]:
            self.keys[b].append(k)
            self.values[b].append(v)
        return self.keys[b].view(), self.values[b].view()

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` real tokens per sequence: buffers made later start at it, existing ones grow to it."""
        self.reserved = max(self.reserved, tokens)
        for lst in (self.keys, self.values):
            for buf in lst:
                if buf is not None:
                    buf.reserve(tokens)

    def length(self, b: int) -> int:
        return 0 if not self.keys or self.keys[b] is None else self.keys[b].length

    def compressed(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K1/K2 of sequence b, brought up to date with its keys incrementally."""
        keys = self.keys[b].view()
        out = []
        for level, (ks, s) in enumerate(((self.kernel_size, self.kernel_stride), (4 * self.kernel_size, 4 * self.kernel_stride))):
            store = self.k1 if level == 0 else self.k2
            have = 0 if store[b] is None else store[b].length
            if n_compressed(keys.shape[0], ks, s) > have:
                new = compress_keys(keys, ks, s, start=have)
                if store[b] is None:
                    store[b] = _GrowBuffer(new, min_capacity=16)
                else:
                    store[b].append(new)
            out.append(store[b].view() if store[b] is not None else keys.new_empty(0, *keys.shape[1:]))
        return out[0], out[1]

    def select(self, indices: list[int]) -> None:
        for name in ("keys", "values", "k1", "k2"):
            lst = getattr(self, name)
            if lst:
                setattr(self, name, [None if lst[i] is None else lst[i].clone() for i in indices])

    def nbytes(self) -> int:
        return sum(x.nbytes() for lst in (self.keys, self.values, self.k1, self.k2) for x in lst if x is not None)


class LightningLayerCache:
    """The float32 recurrent state ``[B, H, K, V]`` of one lightning layer."""

    is_sliding = False
    is_compileable = False

    def __init__(self):
        self.state: torch.Tensor | None = None

    def select(self, indices: list[int]) -> None:
        if self.state is not None:
            self.state = self.state[torch.tensor(indices, device=self.state.device)].clone()

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.numel() * self.state.element_size()


class SALACache(Cache):
    """Hybrid cache for ``SALAForCausalLM``; works with ``generate()`` and left-padded batches.

    ``seen_tokens`` counts input positions processed (padding included), which is what generation uses to
    slice new tokens; each sparse layer also knows each sequence's real length.
    """

    is_compileable = False

    def __init__(self, config: SALAConfig):
        sc = config.sparse_config or {"kernel_size": 32, "kernel_stride": 16}
        layers = [
            LightningLayerCache() if m == LIGHTNING else SparseLayerCache(sc["kernel_size"], sc["kernel_stride"])
            for m in config.mixer_types
        ]
        try:
            super().__init__(layers=layers)
        except TypeError:  # older/newer Cache signatures: the state we need is our own anyway
            self.layers = layers
        self.layers = layers
        self.config = config
        self.seen_tokens = 0

    # ---- what generation and the model use
    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.seen_tokens + q, 0

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if isinstance(layer, LightningLayerCache) and layer.state is not None:
                return layer.state.shape[0]
            if isinstance(layer, SparseLayerCache) and layer.keys:
                return len(layer.keys)
        return -1

    def reset(self) -> None:
        self.__init__(self.config)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a lightning-attention state cannot be rolled back; SALACache does not support crop()")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
        for layer in self.layers:
            layer.select(idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self.batch_size
        if n > 0:
            self.batch_select_indices(torch.arange(n).repeat_interleave(repeats))

    def reserve(self, tokens: int) -> None:
        """Allocate K/V room for ``tokens`` tokens per sequence (prompt + new tokens) in every sparse layer.

        Optional: without it buffers grow by 1.25x as tokens arrive. With it, a 1M-token prefill followed by
        decoding holds exactly ``tokens`` rows and never copies them to grow.
        """
        if tokens < 0:
            raise ValueError(f"reserve takes a token count >= 0, got {tokens}")
        for layer in self.layers:
            if isinstance(layer, SparseLayerCache):
                layer.reserve(tokens)

    # ---- memory accounting
    def nbytes(self) -> int:
        """Bytes held right now by every layer (allocated capacity)."""
        return sum(layer.nbytes() for layer in self.layers)

    @staticmethod
    def bytes_per_token(config: SALAConfig, dtype: torch.dtype = torch.bfloat16) -> float:
        """Cache bytes added by each token of one sequence: K/V of the sparse layers plus compressed keys."""
        return cache_bytes_per_token(config, dtype)

    @staticmethod
    def fixed_bytes_per_sequence(config: SALAConfig) -> int:
        """Constant bytes per sequence: the float32 lightning states."""
        return lightning_state_bytes(config)


def cache_bytes_per_token(config: SALAConfig, dtype: torch.dtype = torch.bfloat16) -> float:
    elt = torch.empty(0, dtype=dtype).element_size()
    n_sparse = len(config.sparse_layers)
    if not n_sparse:
        return 0.0
    kv = 2 * config.num_key_value_heads * config.sparse_head_dim * elt
    sc = config.sparse_config
    compressed = config.num_key_value_heads * config.sparse_head_dim * elt * (1 / sc["kernel_stride"] + 1 / (4 * sc["kernel_stride"]))
    return n_sparse * (kv + compressed)


def lightning_state_bytes(config: SALAConfig) -> int:
    return len(config.lightning_layers) * config.num_attention_heads * config.head_dim * config.head_dim * 4
