"""Which teacher layers stay softmax (later sparse) attention and which become Lightning layers.

A layer map is the sorted list of attention-layer indices. Besides HALO's score-based choice
(``select.py``) there are the baselines: uniform interleaving and all-linear, and an explicit list.
"""

from __future__ import annotations

from ..config import LIGHTNING, SPARSE


def n_attention(num_layers: int, ratio: float) -> int:
    """How many layers a ratio keeps as attention (at least one unless the ratio is 0)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"attention ratio must be in [0, 1], got {ratio}")
    return 0 if ratio == 0 else max(1, round(ratio * num_layers))


def uniform_layers(num_layers: int, ratio: float = 0.25, force_first_last: bool = True) -> list[int]:
    """Evenly spaced attention layers.

    With ``force_first_last`` the ends are kept and the rest spread between them (32 layers, 25%:
    0, 4, 9, 13, 18, 22, 27, 31); without it every (L/k)-th layer counting from the last.
    """
    k = n_attention(num_layers, ratio)
    if k == 0:
        return []
    if k >= num_layers:
        return list(range(num_layers))
    if force_first_last and k >= 2:
        step = (num_layers - 1) / (k - 1)
        return sorted({round(i * step) for i in range(k)})
    stride = num_layers / k
    return sorted({min(num_layers - 1, round((i + 1) * stride) - 1) for i in range(k)})


def parse_layers(text: str, num_layers: int, ratio: float = 0.25, force_first_last: bool = True) -> list[int]:
    """``"0,9,31"`` | ``"uniform"`` | ``"all-linear"`` | ``"all-attention"`` -> attention-layer indices."""
    t = text.strip().lower()
    if t in ("all-linear", "none", "linear"):
        return []
    if t in ("all-attention", "all", "attention"):
        return list(range(num_layers))
    if t == "uniform":
        return uniform_layers(num_layers, ratio, force_first_last)
    try:
        layers = sorted({int(x) for x in t.replace(" ", "").split(",") if x})
    except ValueError:
        raise ValueError(f"not a layer list: {text!r} (use e.g. '0,9,31', 'uniform', 'all-linear')") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"attention layers {bad} out of range for {num_layers} layers")
    return layers


def mixer_types(num_layers: int, attention_layers: list[int]) -> list[str]:
    keep = set(attention_layers)
    return [SPARSE if i in keep else LIGHTNING for i in range(num_layers)]
