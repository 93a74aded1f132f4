"""sala.layers.fusion: the compiled elementwise chains compute what the eager layers compute, forward and
backward (compiled on the CPU here; training turns it on for CUDA)."""

from __future__ import annotations

import torch

from sala.config import SALAConfig
from sala.layers import fusion
from sala.layers.common import add_rms_norm, rms_norm
from sala.layers.lightning import norm_and_gate, prepare_qkv
from sala.modeling import SALAForCausalLM


def _tiny_model() -> SALAForCausalLM:
    cfg = SALAConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, mixer_types=["lightning", "minicpm4"], lightning_nkv=2)
    torch.manual_seed(0)
    return SALAForCausalLM(cfg).float()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_model_matches_eager_forward_and_backward():
    model = _tiny_model()
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = _loss_and_grads(model, ids)
    fusion._COMPILED.clear()
    with fusion.fusion(devices=("cpu",)):
        logits, grads = _loss_and_grads(model, ids)
    assert {f.__name__ for f in fusion._COMPILED} >= {
        "rms_norm", "add_rms_norm", "residual_add", "silu_mul", "prepare_qkv", "norm_and_gate"}
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not fusion.fusion_active(ids.float())  # off again after the block


def test_fusion_is_off_by_default_and_for_other_devices():
    x = torch.randn(3, 8)
    assert not fusion.fusion_active(x)
    with fusion.fusion():  # CUDA only by default
        assert not fusion.fusion_active(x)


def test_fusable_functions_match_the_layers_math():
    g = torch.Generator().manual_seed(2)
    h, upd, w = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.rand(8, generator=g) + 0.5
    h2, normed = add_rms_norm(h, upd, 0.3, w, 1e-6)
    torch.testing.assert_close(h2, h + 0.3 * upd)
    ref = (h2 / h2.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) * w
    torch.testing.assert_close(normed, ref)
    q, k, v = (torch.randn(1, 5, n, 4, generator=g) for n in (4, 2, 2))
    q2, k2, v2 = prepare_qkv(q, k, v, None, None, 0.0, None, None, 2, torch.bfloat16)
    assert q2.dtype == k2.dtype == v2.dtype == torch.bfloat16 and k2.shape == (1, 5, 4, 4)
    torch.testing.assert_close(k2[:, :, 1].float(), k[:, :, 0].bfloat16().float())  # heads repeated in place
    o, z = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    torch.testing.assert_close(norm_and_gate(o, torch.float32, w, 1e-6, z), rms_norm(o, w, 1e-6) * torch.sigmoid(z))
