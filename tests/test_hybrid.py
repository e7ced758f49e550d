from functools import partial

import numpy as np
import pytest
import torch

import vitkit
from vitkit import ViTConfig, create_model
from vitkit.hybrid import npz_spec, npz_to_state, state_to_npz

timm = pytest.importorskip("timm")

# Two stages of one unit each: stride 8, GroupNorm(32) needs every width to be a multiple of 32.
TINY_SPEC = {"type": "resnet", "layers": [1, 1], "stride": 8, "width": 32}
TINY = dict(patch_size=1, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=5)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere; norm scales near 1 so the ResNet's signal does not vanish."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model


def _timm_tiny_hybrid(img_size, layers=(1, 1), width=32, patch_size=1):
    """timm's hybrid ViT with the same tiny ResNetV2 that TINY_SPEC describes."""
    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
    from timm.models.vision_transformer import VisionTransformer

    conv = partial(StdConv2dSame, eps=1e-8)
    if layers:
        backbone = ResNetV2(layers=list(layers), channels=[4 * width * 2 ** i for i in range(len(layers))],
                            stem_chs=width, num_classes=0, global_pool="", preact=False, stem_type="same",
                            conv_layer=conv)
    else:
        backbone = create_resnetv2_stem(3, width, stem_type="same", preact=False, conv_layer=conv)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=1, num_heads=2,
                             mlp_ratio=2.0, num_classes=5, embed_layer=partial(HybridEmbed, backbone=backbone))


@pytest.mark.parametrize("img_size", [(32, 32), (40, 24)])  # 40x24 pads asymmetrically (TF SAME)
def test_tiny_hybrid_matches_timm(img_size):
    ref = _randomize(_timm_tiny_hybrid(img_size)).eval()
    model = create_model(ViTConfig(img_size=img_size, hybrid_stem=TINY_SPEC, **TINY)).eval()
    model.load_state_dict(ref.state_dict())  # strict: timm's parameter names, one for one
    x = torch.randn(2, 3, *img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)
    assert model.patch_embed(x).shape == (2, (img_size[0] // 8) * (img_size[1] // 8), 32)


def test_same_padding_matches_timms_for_every_size():
    # The padding is computed without ceil (so export sees constants); it must still be TF's
    # "SAME" for sizes the stride divides and for those it does not (eager callers of StdConv2d).
    from timm.layers.padding import pad_same

    from vitkit.hybrid import _pad_same

    for kernel, stride in [(1, 1), (1, 2), (3, 1), (3, 2), (7, 2), (2, 3)]:
        for h, w in [(1, 1), (5, 8), (8, 5), (13, 24), (24, 13), (31, 40)]:
            x = torch.randn(1, 1, h, w)
            torch.testing.assert_close(_pad_same(x, kernel, stride), pad_same(x, [kernel] * 2, [stride] * 2),
                                       rtol=0, atol=0, msg=f"k={kernel} s={stride} {h}x{w}")
    x = torch.randn(1, 1, 7, 6)
    assert torch.equal(_pad_same(x, 3, 2, value=float("-inf")),
                       pad_same(x, [3, 3], [2, 2], value=float("-inf")))


def test_root_only_hybrid_matches_timm():
    ref = _randomize(_timm_tiny_hybrid(32, layers=(), patch_size=2)).eval()
    spec = {"type": "resnet", "layers": [], "stride": 4, "width": 32}
    model = create_model(ViTConfig(img_size=32, hybrid_stem=spec, **{**TINY, "patch_size": 2})).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["vit_base_r50_s16_224", "vit_tiny_r_s16_p8_224"])
def test_named_hybrids_match_timm_layout(name, tmp_path):
    # The real R50 (stages 3, 4, 9) and R+Ti backbones, one transformer block, at 32/64 px.
    img = 64 if "tiny" in name else 32
    ref = _randomize(timm.create_model(name, img_size=img, depth=1, num_classes=5)).eval()
    model = create_model(name, img_size=img, depth=1, num_classes=5).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)
    # ... and through vitkit's own format.
    vitkit.save_pretrained(model, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(vitkit.load_pretrained(tmp_path / "m")(x), ref(x), atol=1e-4, rtol=1e-4)


def test_paper_name_and_parameter_count():
    config = vitkit.variants.resolve("R50+ViT-B/16")
    assert config == vitkit.variants.resolve("vit_base_r50_s16_224")
    assert config.grid_size == (14, 14) and config.stem_stride == (16, 16)
    # The name shown is one create_model takes, for every registered hybrid (AugReg's R+ViT-Ti/16
    # has 32 pixels per token, and a stem of the root conv alone is "R+", not "R2+").
    for name in ("R50+ViT-B/16", "R50+ViT-L/32", "R26+ViT-S/32", "R+ViT-Ti/16"):
        assert vitkit.variants.paper_name(vitkit.variants.resolve(name)) == name
    assert vitkit.variants.paper_name(vitkit.variants.resolve("vit_tiny_r_s16_p8_384")) == "R+ViT-Ti/16"
    with torch.device("meta"):
        ours = create_model("R50+ViT-B/16")
        ref = timm.create_model("vit_base_r50_s16_224", num_classes=1000)  # its default cfg has no head
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in ref.named_parameters()}


def test_npz_layout_round_trip_and_spec():
    model = _randomize(create_model(ViTConfig(img_size=32, hybrid_stem=TINY_SPEC, **TINY)))
    state = model.state_dict()
    arrays = state_to_npz(state, prefix="opt/target/")
    assert arrays["opt/target/conv_root/kernel"].shape == (7, 7, 3, 32)  # HWIO
    assert "opt/target/block2/unit1/gn_proj/scale" in arrays and "opt/target/block1/unit1/conv3/kernel" in arrays
    assert npz_spec(arrays, prefix="opt/target/") == TINY_SPEC
    back = npz_to_state(arrays, prefix="opt/target/")
    backbone = {k: v for k, v in state.items() if k.startswith("patch_embed.backbone.")}
    assert set(back) == set(backbone)
    for key, value in backbone.items():
        torch.testing.assert_close(back[key], value)


def test_npz_kernels_are_hwio():
    # Independent of our transposes: a JAX conv computes out[o] = sum_hwi x[h, w, i] * K[h, w, i, o].
    model = _randomize(create_model(ViTConfig(img_size=32, hybrid_stem=TINY_SPEC, **TINY)))
    arrays = state_to_npz(model.state_dict())
    K = arrays["conv_root/kernel"]  # (7, 7, 3, 32)
    patch = np.random.default_rng(0).normal(size=(7, 7, 3)).astype(np.float32)  # (H, W, C)
    jax_style = np.einsum("hwi,hwio->o", patch, K)
    weight = npz_to_state(arrays)["patch_embed.backbone.stem.conv.weight"]
    torch_style = torch.nn.functional.conv2d(torch.from_numpy(patch).permute(2, 0, 1)[None], weight)
    np.testing.assert_allclose(torch_style.flatten().numpy(), jax_style, rtol=1e-4, atol=1e-4)


def test_bad_specs_name_the_key():
    with pytest.raises(ValueError, match="stride"):
        create_model(ViTConfig(img_size=32, hybrid_stem={**TINY_SPEC, "stride": 16}, **TINY))
    with pytest.raises(ValueError, match="unknown keys"):
        create_model(ViTConfig(img_size=32, hybrid_stem={**TINY_SPEC, "depth": 3}, **TINY))
    with pytest.raises(ValueError, match="width"):
        create_model(ViTConfig(img_size=32, hybrid_stem={**TINY_SPEC, "width": 48}, **TINY))
    model = create_model(ViTConfig(img_size=32, hybrid_stem=TINY_SPEC, **TINY))
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 36, 32))


@pytest.mark.parametrize("name", ["vit_base_r50_s16_224", "vit_tiny_r_s16_p8_224"])
def test_load_pretrained_reads_timm_hybrid_files(name, tmp_path):
    # A timm state dict on disk, read by vitkit's timm converter with the hybrid reader hook.
    from safetensors.torch import save_file

    img = 64 if "tiny" in name else 32
    ref = _randomize(timm.create_model(name, img_size=img, depth=1, num_classes=5)).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    base = vitkit.variants.resolve(name).replace(img_size=img, depth=1, num_classes=5)
    model = vitkit.load_pretrained(tmp_path / "w.safetensors", model=base)
    assert model.config.hybrid_stem == base.hybrid_stem
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


def test_npz_round_trip_through_timms_own_jax_loader(tmp_path):
    # vitkit writes the JAX layout; timm's _load_weights (the reference reader of the original
    # hybrid .npz files) and vitkit's reader must both rebuild the same model from it.
    from timm.models.vision_transformer import _load_weights

    from vitkit.convert.jax_npz import write_npz

    model = _randomize(create_model(ViTConfig(img_size=32, hybrid_stem=TINY_SPEC, **TINY))).eval()
    write_npz(model, path=tmp_path / "r.npz")
    ref = _timm_tiny_hybrid(32).eval()
    _load_weights(ref, str(tmp_path / "r.npz"))
    loaded = vitkit.load_pretrained(tmp_path / "r.npz", model=model.config)
    assert loaded.config.hybrid_stem == TINY_SPEC
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)


def test_convert_to_timm_loads_in_timms_hybrid(tmp_path):
    from safetensors.torch import load_file

    from vitkit.cli import main

    name = "vit_base_r50_s16_224"
    model = _randomize(create_model(name, img_size=32, depth=1, num_classes=5)).eval()
    vitkit.save_pretrained(model, tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "r50.safetensors"), "--to", "timm"]) == 0
    ref = timm.create_model(name, img_size=32, depth=1, num_classes=5).eval()
    ref.load_state_dict(load_file(tmp_path / "r50.safetensors"))  # strict
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), atol=1e-4, rtol=1e-4)
