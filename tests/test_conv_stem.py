import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit import ViTConfig, create_model, load_pretrained, save_pretrained
from vitkit.conv_stem import build_conv_stem

from conftest import randomize

TINY = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=5)


def conv_config(img_size=16, **stem):
    spec = {"type": "conv", "stride": 2, "channels": [8, 16], **stem}
    return ViTConfig(img_size=img_size, patch_size=2, hybrid_stem=spec, **TINY)


@pytest.mark.parametrize("stride, patch, grid", [(1, 4, 4), (2, 2, 4), (4, 1, 4), (2, 1, 8)])
def test_token_grid_follows_stride_times_patch(stride, patch, grid):
    channels = [8] * max(1, stride.bit_length() - 1)
    config = ViTConfig(img_size=16, patch_size=patch, hybrid_stem={"type": "conv", "stride": stride, "channels": channels},
                       **TINY)
    assert config.grid_size == (grid, grid)
    tokens = build_conv_stem(config)(torch.randn(3, 3, 16, 16))
    assert tokens.shape == (3, grid * grid, 32)
    model = create_model(config).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_default_strides_downsample_last_and_tokens_are_raster_order():
    stem = build_conv_stem(conv_config(channels=[4, 8, 16], stride=4)).eval()
    assert [layer.conv.stride for layer in stem.stem] == [(1, 1), (2, 2), (2, 2)]
    # Tokens must be the feature map's positions in raster order, as PatchEmbed numbers them.
    x = torch.randn(2, 3, 16, 16)
    fmap = stem.proj(stem.stem(x))  # (B, D, 2, 2)
    tokens = stem(x)
    torch.testing.assert_close(tokens[:, 1], fmap[:, :, 0, 1])
    torch.testing.assert_close(tokens[:, 2], fmap[:, :, 1, 0])


def test_group_norm_stem_is_batch_independent():
    stem = build_conv_stem(conv_config(norm="group")).train()
    x = torch.randn(4, 3, 16, 16)
    # GroupNorm normalises each sample alone, so one image's tokens don't depend on its batch.
    torch.testing.assert_close(stem(x)[:1], stem(x[:1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stem, message", [
    ({"channels": []}, "channels"),
    ({"channels": [8, -1]}, "channels"),
    ({"stride": 3, "img_size": 12}, "power of two"),
    ({"stride": 8}, "at least 3 conv layers"),
    ({"strides": [2, 2]}, "downsample by 4"),
    ({"strides": [1, 3]}, "strides"),
    ({"norm": "layer"}, "norm"),
    ({"downsample": "avgpool"}, "downsample"),
    ({"kernel": 5}, "unknown keys"),
])
def test_bad_stem_specs_name_the_key(stem, message):
    with pytest.raises(ValueError, match=message):
        create_model(conv_config(**stem))


def test_maxpool_downsampling_pools_the_full_resolution_conv_and_keeps_the_weights():
    strided = build_conv_stem(conv_config()).eval()
    pooled = build_conv_stem(conv_config(downsample="maxpool")).eval()
    # No parameters added or renamed: a checkpoint of either loads into the other.
    pooled.load_state_dict(randomize(strided).state_dict())
    layer = pooled.stem[1]  # the stride-2 layer
    assert layer.conv.stride == (1, 1)
    x = torch.randn(2, 3, 16, 16)
    hidden = pooled.stem[0](x)
    expected = layer.act(layer.norm(F.max_pool2d(layer.conv(hidden), 2)))
    torch.testing.assert_close(layer(hidden), expected)
    assert pooled(x).shape == strided(x).shape == (2, 16, 32)
    assert not torch.allclose(pooled(x), strided(x))


def test_image_not_divisible_by_stem_stride_is_refused():
    stem = build_conv_stem(conv_config())
    with pytest.raises(ValueError, match="stride 4x4"):
        stem(torch.randn(1, 3, 18, 18))


@pytest.mark.parametrize("name", ["vit_cifar", "vit_cifar_conv", "hybrid-cifar"])
def test_registered_small_image_models_train_at_tiny_size(name):
    assert name in vitkit.list_models()
    config = vitkit.variants.resolve(name)
    assert config.img_size == (32, 32) and config.num_classes == 10 and config.grid_size == (8, 8)
    small = {"embed_dim": 32, "num_heads": 2, "mlp_dim": 32, "depth": 1}
    if config.hybrid_stem:
        small["hybrid_stem"] = {**config.hybrid_stem, "channels": [8] * len(config.hybrid_stem["channels"])}
    model = randomize(create_model(name, **small)).train()  # a zero head would pass no gradient back
    x = torch.randn(4, 3, 32, 32)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    # Every parameter, the stem's included, must receive a gradient.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    if config.hybrid_stem:
        assert model.patch_embed.stem[0].conv.weight.grad.abs().sum() > 0


def test_full_size_registered_models_have_expected_size():
    with torch.device("meta"):
        plain = create_model("vit_cifar")
        hybrid = create_model("vit_cifar_conv")
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert 2.0 < count(plain) < 3.0
    assert 3.0 < count(hybrid) < 5.0


def test_conv_stem_model_round_trips_through_save_and_load(tmp_path):
    model = randomize(create_model(conv_config()))
    # BatchNorm's running statistics are buffers: they must travel with the weights.
    model.train()
    model(torch.randn(8, 3, 16, 16))
    model.eval()
    assert model.patch_embed.stem[0].norm.num_batches_tracked.item() == 1
    model.class_names = list("abcde")
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.class_names == list("abcde")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("to, name", [("npz", "out.npz"), ("timm", "out.safetensors"), ("hf", "out_hf")])
def test_convert_refuses_formats_without_a_conv_stem(tmp_path, to, name):
    # Written anyway, the stem would be dropped and the file would load as a plain ViT that fails on images.
    from vitkit.cli import main

    save_pretrained(create_model(conv_config()), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / name), "--to", to]) != 0
    assert not (tmp_path / name).exists()


def test_several_gpus_synchronise_the_stems_batch_norm(capsys):
    # Converting needs no GPU; the checkpoint keys stay BatchNorm's, so saved runs load anywhere.
    from vitkit.train.setup import _share_batch_norm

    model = create_model("vit_cifar_conv")
    keys = set(model.state_dict())
    _share_batch_norm(model, device=torch.device("cuda"), main=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert set(model.state_dict()) == keys
    _share_batch_norm(create_model("vit_cifar_conv"), device=torch.device("cpu"), main=True)
    assert "SyncBatchNorm" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vit_cifar_conv", "R50+ViT-B/16"])
def test_info_counts_the_cnn_stem(name):
    # The stem's convolutions are most of a hybrid's early compute: count_flops must include them.
    from torch.utils.flop_counter import FlopCounterMode

    from vitkit.model import count_flops
    from vitkit.variants import paper_name

    model = create_model(name).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, *model.config.img_size))
    assert count_flops(model.config)["total"] == pytest.approx(counter.get_total_flops(), rel=0.05)
    if name.startswith("R50"):
        assert paper_name(model.config) == "R50+ViT-B/16"
