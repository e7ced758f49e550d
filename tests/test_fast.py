"""Each fast path computes the plain model's function: same logits, same gradients, same update."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize
from vitkit.config import ViTConfig
from vitkit.fast import attention_backends, make_adamw, optimize_for_inference, optimize_for_training
from vitkit.model import VisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=10)


def _pair():
    plain = randomize(VisionTransformer(ViTConfig(**TINY))).eval()
    return plain, copy.deepcopy(plain)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bf16_weights_give_the_fp32_logits_to_bf16_rounding():
    plain, fast = _pair()
    x = torch.randn(4, 3, 32, 32)
    fast = optimize_for_inference(fast, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        ref, got = plain(x), fast(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert 1e-4 < _rel(got, ref) < 2e-2  # bf16 rounding: visibly not fp32, and no worse than bf16


@pytest.mark.parametrize("backend", ["math", "efficient", "flash", "cudnn", "default", "auto"])
def test_every_attention_backend_choice_keeps_the_logits(backend):
    plain, fast = _pair()
    x = torch.randn(3, 3, 32, 32)
    fast = optimize_for_inference(fast, sdpa_backend=backend)
    with torch.no_grad():
        # On the CPU only math runs; the list keeps it as a fallback behind the chosen kernel.
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-6)


def test_auto_backend_is_pytorchs_default_off_hopper():
    from torch.nn.attention import SDPBackend

    assert attention_backends("auto", device="cpu") is None
    assert attention_backends("cudnn", device="cpu")[0] == SDPBackend.CUDNN_ATTENTION
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_backends("fastest", device="cpu")


def test_compiled_inference_gives_the_eager_logits():
    plain, fast = _pair()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize_for_inference(fast, compile=True, sdpa_backend="math")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


def test_training_fast_path_gives_the_same_step():
    """Gradient checkpointing and the fused AdamW: the same loss, gradients and updated weights."""
    plain, fast = _pair()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = copy.deepcopy(plain)
    plain.train()
    ref_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    run = optimize_for_training(fast, grad_checkpointing=True, sdpa_backend="math")
    opt = make_adamw(fast.parameters(), lr=1e-2, weight_decay=0.05)
    assert opt.defaults["fused"] and fast.grad_checkpointing
    for model, step_model, optimizer in ((plain, plain, ref_opt), (fast, run, opt)):
        F.cross_entropy(step_model(x), y).backward()
        optimizer.step()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # The step really moved the weights (lr 1e-2), so the comparison above compared updates.
    assert all((p - q).abs().max() > 1e-4 for p, q in zip(plain.parameters(), before.parameters()))


def test_bad_compile_mode_is_refused():
    with pytest.raises(ValueError, match="unknown compile mode"):
        optimize_for_inference(_pair()[1], compile=True, compile_mode="fastest")
