"""FP8 matmuls (opt-in): the rounding they add, gradients that still point the right way, and a
model that trains as well as in float32. CPU runs the same scaled-FP8 arithmetic as Hopper."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize
from vitkit.bench import benchmark_throughput
from vitkit.config import ViTConfig
from vitkit.fast import make_adamw, optimize_for_inference, optimize_for_training
from vitkit.fp8 import E4M3, E5M2, Float8Linear, check_device, convert_to_fp8, to_float8
from vitkit.model import VisionTransformer

TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=4)


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _linear_pair(bias=True):
    plain = torch.nn.Linear(64, 48, bias=bias)
    fp8 = Float8Linear(64, 48, bias=bias)
    fp8.load_state_dict(plain.state_dict())
    return plain, fp8


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_scaling_puts_the_largest_value_at_the_formats_largest(dtype):
    t = torch.randn(100, 32) * 1e-3  # far below FP8's range unscaled: scaling is what keeps it
    t8, inverse = to_float8(t, dtype)
    assert t8.dtype == dtype
    assert t8.float().abs().max() == torch.finfo(dtype).max
    # e4m3 keeps 3 mantissa bits (relative rounding <= 1/16), e5m2 keeps 2 (<= 1/8), plus underflow of tiny entries.
    assert _rel(t8.float() * inverse, t) < (0.04 if dtype == E4M3 else 0.08)
    zeros8, _ = to_float8(torch.zeros(4, 4), dtype)
    assert not zeros8.float().any()


@pytest.mark.parametrize("rows", [32, 37])  # 37: padded to 48 rows for the matmul, sliced back
def test_float8_linear_is_the_linear_to_fp8_rounding(rows):
    plain, fp8 = _linear_pair()
    x = torch.randn(rows, 64, requires_grad=True)
    x8 = x.detach().clone().requires_grad_(True)
    y, y8 = plain(x), fp8(x8)
    assert y8.shape == y.shape and 0.005 < _rel(y8, y) < 0.06  # rounded, as e4m3 rounds: not float32
    grad = torch.randn_like(y)
    y.backward(grad)
    y8.backward(grad)
    assert _rel(x8.grad, x.grad) < 0.12  # e5m2 gradient times e4m3 weight
    assert _rel(fp8.weight.grad, plain.weight.grad) < 0.12
    assert fp8.weight.grad.dtype == torch.float32  # accumulated over all rows in float32
    torch.testing.assert_close(fp8.bias.grad, plain.bias.grad)  # the bias never passes through FP8


def test_float8_linear_keeps_batch_dimensions_autocast_dtype_and_no_bias():
    plain, fp8 = _linear_pair(bias=False)
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y8 = fp8(x)
    assert y8.shape == (2, 5, 48) and y8.dtype == torch.bfloat16
    assert _rel(y8, plain(x)) < 0.06


def test_inference_scales_each_token_and_training_the_whole_tensor():
    # A token a million times smaller than the largest flushes to zero under one scale for the
    # whole tensor (e4m3 spans 2^-9 .. 448), not under a scale of its own.
    plain, fp8 = _linear_pair(bias=False)
    x = torch.randn(32, 64)
    x[1] *= 1e-6
    reference = plain(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rowwise = fp8(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tensorwise = fp8(x)
    assert _rel(rowwise[1], reference[1]) < 0.06
    assert not tensorwise[1].any()
    assert 0.005 < _rel(rowwise, reference) < 0.06


def test_an_empty_batch_passes_through():
    plain, fp8 = _linear_pair()
    x = torch.randn(0, 5, 64, requires_grad=True)
    y = fp8(x)
    assert y.shape == (0, 5, 48)
    y.sum().backward()
    assert fp8.weight.grad is not None and not fp8.weight.grad.any()  # reached, as in nn.Linear


def test_devices_without_fp8_matmuls_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="compute capability 8.9 or newer.*A100 is 8.0"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device("cuda")
    with pytest.raises(ValueError, match="not on mps"):
        check_device("mps")
    check_device("cpu")


def test_conversion_swaps_the_blocks_linears_and_keeps_parameters_and_checkpoints():
    model = VisionTransformer(ViTConfig(**TINY))
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert convert_to_fp8(model) == 4 * TINY["depth"]  # qkv, proj, fc1, fc2 per block
    assert isinstance(model.blocks[0].attn.qkv, Float8Linear) and isinstance(model.blocks[1].mlp.fc2, Float8Linear)
    assert type(model.head) is torch.nn.Linear  # 4 classes: not a multiple of 16, and outside the blocks
    assert all(p is params[name] for name, p in model.named_parameters())  # an optimizer built before still works
    assert list(model.state_dict()) == keys
    assert convert_to_fp8(model) == 4 * TINY["depth"]  # a second time changes nothing
    odd = VisionTransformer(ViTConfig(**{**TINY, "embed_dim": 24, "num_heads": 2, "mlp_dim": 40}))
    with pytest.raises(ValueError, match="divisible by 16"):
        convert_to_fp8(odd)


def test_fp8_model_logits_stay_close_to_float32():
    plain = randomize(VisionTransformer(ViTConfig(**TINY))).eval()
    fast = optimize_for_inference(copy.deepcopy(plain), fp8=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert 1e-4 < _rel(fast(x), plain(x)) < 0.1  # FP8 rounding, far above float32 reordering (~1e-7)


def _striped_images(n, generator):
    """Class = stripe direction (rows or columns) x colour (red or blue), under noise: learnable
    in a few dozen steps, never by chance."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.randn(n, 3, 16, 16, generator=generator) * 0.5
    stripes = (torch.arange(16) % 4 < 2).float()
    for i, k in enumerate(labels.tolist()):
        direction, colour = divmod(k, 2)
        pattern = stripes[:, None].expand(16, 16) if direction == 0 else stripes[None, :].expand(16, 16)
        images[i, 2 * colour] += 1.5 * pattern
    return images, labels


def _train(model, fp8, steps=40):
    generator = torch.Generator().manual_seed(1)
    run = optimize_for_training(model, fp8=fp8)
    optimizer = make_adamw(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        images, labels = _striped_images(16, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(run(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    images, labels = _striped_images(256, torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        accuracy = (run(images).argmax(1) == labels).float().mean().item()
    return losses, accuracy


def test_fp8_training_learns_like_bf16():
    start = VisionTransformer(ViTConfig(**TINY))
    losses, accuracy = _train(copy.deepcopy(start), fp8=False)
    losses8, accuracy8 = _train(copy.deepcopy(start), fp8=True)
    assert accuracy > 0.95 and accuracy8 > 0.95  # chance is 0.25
    assert sum(losses8[-10:]) < 0.2 * sum(losses8[:10])
    assert abs(sum(losses8[-10:]) - sum(losses[-10:])) / 10 < 0.02  # the same curve, to FP8 rounding


def test_bench_applies_fp8_to_vitkit_only_and_names_the_lever(monkeypatch):
    import vitkit.fp8

    converted = []
    real = vitkit.fp8.convert_to_fp8
    monkeypatch.setattr(vitkit.fp8, "convert_to_fp8", lambda model: converted.append(type(model).__name__) or real(model))
    config = ViTConfig(**{**TINY, "num_classes": 16})
    rows = benchmark_throughput(model="tiny", config=config, batch_size=2, precision="bf16", peers=["timm"], fp8=True,
                                steps=1, repeats=1, warmup=0, matmul_tflops=1.0, device="cpu")
    assert [(r["impl"], r["levers"]) for r in rows] == [("vitkit", "fp8"), ("timm", "-")] * 2
    assert converted == ["VisionTransformer"] * 2  # inference and training, never timm's model


def _count_fp8_matmuls(monkeypatch) -> list:
    import vitkit.fp8

    calls, real = [], vitkit.fp8._Float8Matmul.forward
    monkeypatch.setattr(vitkit.fp8._Float8Matmul, "forward", staticmethod(lambda ctx, *a: calls.append(1) or real(ctx, *a)))
    return calls


def test_train_with_fp8_learns_and_saves_ordinary_weights(tmp_path, capsys, monkeypatch):
    from test_train import make_shapes, tiny_config
    from vitkit.pretrained import load_pretrained
    from vitkit.train import train

    calls = _count_fp8_matmuls(monkeypatch)
    shapes = make_shapes(tmp_path / "shapes", per_class=24, val_per_class=6)
    summary = train(tiny_config(shapes, tmp_path / "run", fp8=True))
    assert summary["best_val_acc"] >= 0.9  # chance is 1/3; the same bar as the float32 run's test
    assert len(calls) >= 4 * 6 * 3  # 4 linears x 6 epochs x 3 steps at least: it did run in FP8
    err = capsys.readouterr().err
    assert "--fp8 on the CPU" in err and "linear layers run in FP8" not in err
    model = load_pretrained(str(tmp_path / "run"))
    assert not any(isinstance(m, Float8Linear) for m in model.modules())  # loads as the plain model


def test_bench_cli_takes_fp8(capsys):
    import json

    from vitkit.cli import main

    assert main(["bench", "throughput", "--model", "ViT-Ti/16", "--img-size", "32", "--batch-size", "1",
                 "--precision", "bf16", "--peers", "", "--steps", "1", "--repeats", "1", "--warmup", "0",
                 "--modes", "infer", "--device", "cpu", "--fp8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["impl"], r["levers"]) for r in rows] == [("vitkit", "fp8")]


def test_partial_fp8_is_reported_and_unfit_widths_are_one_line_errors(tmp_path, capsys):
    from test_train import make_shapes, tiny_config
    from vitkit.errors import VitkitError
    from vitkit.train import train

    shapes = make_shapes(tmp_path / "shapes", per_class=8, val_per_class=2)
    partial = dict(model="vit_cifar", model_overrides=dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=40))
    train(tiny_config(shapes, tmp_path / "partial", fp8=True, epochs=1, **partial))  # fc1/fc2: 40 wide
    assert "2 of the blocks' 4 linear layers run in FP8" in capsys.readouterr().err
    odd = ViTConfig(**{**TINY, "embed_dim": 24, "mlp_dim": 40, "num_classes": 16})
    with pytest.raises(VitkitError, match="^--fp8: no linear layer .* divisible by 16$"):
        benchmark_throughput(model="odd", config=odd, batch_size=2, precision="bf16", peers=[], fp8=True,
                             steps=1, repeats=1, warmup=0, matmul_tflops=1.0, device="cpu")
