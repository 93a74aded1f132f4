"""Lightning attention (Simple-GLA with a fixed per-head decay) in pure PyTorch.

This is the semantic reference every Lightning kernel is tested against (SPEC section 3):

    S_t = exp(g_h) * S_{t-1} + k_t^T v_t        (state S: [K, V] per head, float32)
    o_t = scale * q_t @ S_t                     (current token included, no normalizer)

Layout follows fla: q, k, v are ``[B, T, H, D]``; states are ``[N, H, K, V]`` in float32, one per
sequence. Variable-length batches are packed with ``B == 1`` and ``cu_seqlens`` (int, ``[N + 1]``), as in
fla, so that padding never enters a state. All math runs in float32 (the release casts q/k/v to fp32);
outputs are float32.

Two forms with the same semantics:
- ``lightning_attn_chunked``: the parallel chunk form used for prefill, O(T * C * D) work, processes
  the sequence in segments of chunks so that memory stays bounded at any length;
- ``lightning_attn_recurrent``: the token-by-token recurrence (decode; also the simplest oracle).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "alibi_slopes",
    "lightning_decay",
    "lightning_attn_chunked",
    "lightning_attn_recurrent",
    "lightning_decode_step",
]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi slopes as the release builds them (``_build_slope_tensor``), float32 ``[n_heads]``.

    For a power of two n: start = ratio = 2^(-2^-(log2 n - 3)), slope_i = start * ratio^i; otherwise the
    usual ALiBi interleave of the two neighbouring powers of two.
    """

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    def build(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return power_of_2(closest) + build(2 * closest)[0::2][: n - closest]

    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    return torch.tensor(build(n_heads), dtype=torch.float32, device="cpu")


def lightning_decay(n_heads: int) -> torch.Tensor:
    """Per-step log decay g_h = -slope_h (natural log), float32 ``[n_heads]``."""
    return -alibi_slopes(n_heads)


def _check_inputs(q, k, v, g, initial_state, cu_seqlens):
    if q.dim() != 4 or k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"expected q, k [B, T, H, K] and v [B, T, H, V]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if g.shape != (H,):
        raise ValueError(f"g_gamma must have shape [H]=[{H}], got {tuple(g.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be packed into B == 1, got B={B}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {cu_seqlens.tolist()}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"initial_state must be [N, H, K, V]=[{N}, {H}, {K}, {V}], got {tuple(initial_state.shape)}")
    return N


def _sequences(q, cu_seqlens):
    """Yield (sequence index, batch row, start, end) for a padded or packed batch."""
    if cu_seqlens is None:
        for b in range(q.shape[0]):
            yield b, b, 0, q.shape[1]
    else:
        bounds = cu_seqlens.tolist()
        for n in range(len(bounds) - 1):
            yield n, 0, bounds[n], bounds[n + 1]


def _chunked_one(q, k, v, g, scale, state, chunk_size, segment_chunks):
    """One sequence: q, k [T, H, K], v [T, H, V] float32; state [H, K, V] float32 (updated copy returned)."""
    T, H, K = q.shape
    V = v.shape[-1]
    out = q.new_empty(T, H, V)
    C = chunk_size
    ar = torch.arange(C, dtype=torch.float32, device=q.device)
    # decay factors inside a chunk: D[i, j] = exp(g (i - j)) for j <= i
    diff = ar[:, None] - ar[None, :]
    causal = diff >= 0
    decay_intra = torch.where(causal, torch.exp(g[:, None, None] * diff.clamp(min=0)), torch.zeros((), device=q.device))
    q_decay = torch.exp(g[:, None] * (ar[None, :] + 1))  # [H, C]: exp(g (i + 1))
    seg = C * segment_chunks
    for s0 in range(0, T, seg):
        s1 = min(T, s0 + seg)
        n_full = (s1 - s0) // C
        # full chunks of this segment, vectorized over chunks
        if n_full:
            e = s0 + n_full * C
            qc = q[s0:e].reshape(n_full, C, H, K).permute(0, 2, 1, 3)  # [N, H, C, K]
            kc = k[s0:e].reshape(n_full, C, H, K).permute(0, 2, 1, 3)
            vc = v[s0:e].reshape(n_full, C, H, V).permute(0, 2, 1, 3)
            intra = (qc @ kc.transpose(-1, -2)) * decay_intra  # [N, H, C, C]
            o_intra = intra @ vc  # [N, H, C, V]
            k_decay = torch.exp(g[:, None] * (C - 1 - ar[None, :]))  # [H, C]
            dS = (kc * k_decay[None, :, :, None]).transpose(-1, -2) @ vc  # [N, H, K, V]
            chunk_decay = torch.exp(g * C)[:, None, None]  # [H, 1, 1]
            # sequential scan over chunk states (cheap: N steps of [H, K, V])
            states = []
            for n in range(n_full):
                states.append(state)
                state = chunk_decay * state + dS[n]
            S_prev = torch.stack(states)  # [N, H, K, V], state entering each chunk
            o_inter = (qc * q_decay[None, :, :, None]) @ S_prev
            out[s0:e] = (scale * (o_intra + o_inter)).permute(0, 2, 1, 3).reshape(n_full * C, H, V)
            s0 = e
        if s0 < s1:  # trailing partial chunk (only at the very end of the sequence)
            c = s1 - s0
            qc, kc, vc = (x[s0:s1].permute(1, 0, 2) for x in (q, k, v))  # [H, c, *]
            intra = (qc @ kc.transpose(-1, -2)) * decay_intra[:, :c, :c]
            o = intra @ vc + (qc * q_decay[:, :c, None]) @ state
            out[s0:s1] = (scale * o).permute(1, 0, 2)
            k_decay = torch.exp(g[:, None] * (c - 1 - ar[None, :c]))
            state = torch.exp(g * c)[:, None, None] * state + (kc * k_decay[:, :, None]).transpose(-1, -2) @ vc
    return out, state


def lightning_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    segment_chunks: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form. Returns (o float32 ``[B, T, H, V]``, final states float32 ``[N, H, K, V]``).

    ``segment_chunks`` bounds the memory: intermediates are O(segment_chunks * chunk_size * H * D).
    """
    N = _check_inputs(q, k, v, g_gamma, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    g = g_gamma.to(device=q.device, dtype=torch.float32)
    qf, kf, vf = q.float(), k.float(), v.float()
    out = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    finals = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    for n, b, s, e in _sequences(q, cu_seqlens):
        state = (
            initial_state[n].float().clone()
            if initial_state is not None
            else torch.zeros(H, K, V, dtype=torch.float32, device=q.device)
        )
        if e > s:
            o, state = _chunked_one(qf[b, s:e], kf[b, s:e], vf[b, s:e], g, scale, state, chunk_size, segment_chunks)
            out[b, s:e] = o
        finals[n] = state
    return out, finals


def lightning_attn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence, same signature and semantics as the chunked form.

    ``dtype=torch.float64`` gives the high-precision oracle used in tests.
    """
    N = _check_inputs(q, k, v, g_gamma, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    decay = torch.exp(g_gamma.to(device=q.device, dtype=dtype))[:, None, None]
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    out = torch.empty(B, T, H, V, dtype=dtype, device=q.device)
    finals = torch.empty(N, H, K, V, dtype=dtype, device=q.device)
    for n, b, s, e in _sequences(q, cu_seqlens):
        S = initial_state[n].to(dtype).clone() if initial_state is not None else q.new_zeros(H, K, V, dtype=dtype)
        for t in range(s, e):
            S = decay * S + kf[b, t][:, :, None] * vf[b, t][:, None, :]
            out[b, t] = scale * (qf[b, t][:, None, :] @ S)[:, 0]
        finals[n] = S
    return out, finals


def lightning_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step for a batch: q, k ``[B, H, K]``, v ``[B, H, V]``; ``state [B, H, K, V]`` float32 is
    updated in place. Returns o float32 ``[B, H, V]``."""
    if state.dtype != torch.float32:
        raise ValueError(f"lightning state must be float32, got {state.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    decay = torch.exp(g_gamma.to(device=q.device, dtype=torch.float32))[None, :, None, None]
    state.mul_(decay).add_(k.float()[..., :, None] * v.float()[..., None, :])
    return scale * (q.float()[..., None, :] @ state)[..., 0, :]
