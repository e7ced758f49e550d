"""timm state dicts in and out: same logits as timm's own model, architecture inferred from shapes."""

import pytest
import torch

import vitkit
from vitkit import CheckpointError, ViTConfig, VitkitError
from vitkit.convert import convert
from vitkit.convert.timm import timm_kwargs, write_timm_state_dict

from conftest import randomize

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402


def timm_model(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    return randomize(TimmViT(**args)).eval()


def save(state, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


CASES = {
    "plain": dict(),
    "patch4_width48": dict(patch_size=4, embed_dim=48, num_heads=3),
    "no_qkv_bias": dict(qkv_bias=False),
    "avg_no_class_token": dict(class_token=False, global_pool="avg"),
    "avg_with_class_token_fc_norm": dict(global_pool="avg"),
    "registers": dict(reg_tokens=4),
    "registers_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "qk_norm_layerscale": dict(qk_norm=True, init_values=1e-2),
    "one_channel": dict(in_chans=1),
    "mlp_ratio_2": dict(mlp_ratio=2.0, embed_dim=64, num_heads=2),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_gives_timm_logits(tmp_path, name, suffix):
    kw = CASES[name]
    ref = timm_model(**kw)
    path = save(ref.state_dict(), tmp_path / f"w{suffix}")
    heads = kw.get("num_heads", 4)
    model = vitkit.load_pretrained(path, model=ViTConfig(embed_dim=kw.get("embed_dim", 32), num_heads=heads,
                                                         depth=2, mlp_dim=ref.blocks[0].mlp.fc1.out_features,
                                                         patch_size=kw.get("patch_size", 8),
                                                         in_chans=kw.get("in_chans", 3), img_size=224))
    x = torch.randn(2, kw.get("in_chans", 3), 32, 32)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-4
    assert model.config.img_size == (32, 32) and model.config.num_heads == heads


def test_non_square_image_needs_the_named_size(tmp_path):
    # 4x8 patches + a class entry: 33 entries, no square grid either way.
    wide = save(timm_model(img_size=(32, 64)).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match="not a square grid"):
        vitkit.load_pretrained(wide, model=ViTConfig(embed_dim=32, num_heads=4, depth=2, mlp_dim=128, patch_size=8))
    # 4x6 patches + a class entry is 25 = 5x5: only the named img_size tells them apart.
    ref = timm_model(img_size=(32, 48))
    path = save(ref.state_dict(), tmp_path / "w.safetensors")
    model = vitkit.load_pretrained(path, model=ViTConfig(embed_dim=32, num_heads=4, depth=2, mlp_dim=128,
                                                         patch_size=8, img_size=(32, 48)))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-4


def test_heads_from_the_standard_width_table_and_named_variant(tmp_path):
    # Width 192 is ViT-Ti's: 3 heads, so no model= is needed.
    ref = timm_model(embed_dim=192, num_heads=3, depth=1, patch_size=16)
    path = save(ref.state_dict(), tmp_path / "ti.safetensors")
    model = vitkit.load_pretrained(path)
    assert model.config.num_heads == 3
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-4
    # A named variant whose shapes disagree with the file is refused, naming what differs.
    with pytest.raises(CheckpointError, match="depth"):
        vitkit.load_pretrained(path, model="vit_tiny_patch16_224")


def test_nonstandard_width_asks_for_the_model(tmp_path):
    path = save(timm_model().state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="model="):
        vitkit.load_pretrained(path)


def test_overrides_while_loading(tmp_path):
    path = save(timm_model().state_dict(), tmp_path / "w.safetensors")
    base = ViTConfig(embed_dim=32, num_heads=4, depth=2, mlp_dim=128, patch_size=8)
    with pytest.warns(UserWarning, match="freshly initialised head"):
        model = vitkit.load_pretrained(path, model=base, num_classes=3, img_size=48)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_missing_and_foreign_keys_are_named(tmp_path):
    state = timm_model().state_dict()
    base = ViTConfig(embed_dim=32, num_heads=4, depth=2, mlp_dim=128, patch_size=8)
    broken = {k: v for k, v in state.items() if k != "blocks.1.attn.proj.weight"}
    with pytest.raises(CheckpointError, match=r"w1.safetensors.*blocks\.1\.attn\.proj\.weight"):
        vitkit.load_pretrained(save(broken, tmp_path / "w1.safetensors"), model=base)
    with pytest.raises(CheckpointError, match="not a timm ViT state dict"):
        vitkit.load_pretrained(save({"conv1.weight": torch.zeros(3, 3)}, tmp_path / "w2.safetensors"), model=base)
    extra = {**state, "attn_pool.latent": torch.zeros(1, 1, 32)}
    with pytest.raises(CheckpointError, match="MAP"):
        vitkit.load_pretrained(save(extra, tmp_path / "w3.safetensors"), model=base)
    odd = {**state, "blocks.0.mlp.fc2.weight": torch.zeros(32, 100)}
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc2\.weight"):
        vitkit.load_pretrained(save(odd, tmp_path / "w4.safetensors"), model=base)


@pytest.mark.parametrize("kw", [dict(), dict(class_token=False, global_pool="avg", qkv_bias=False),
                                dict(reg_tokens=2, qk_norm=True, init_values=1e-3, img_size=(32, 48))])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vitkit_to_timm_gives_same_logits_in_timm(tmp_path, kw, suffix):
    model = randomize(vitkit.create_model(ViTConfig(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                                       "num_heads": 4, "mlp_dim": 64, "num_classes": 6, **kw}))).eval()
    model.save_pretrained(tmp_path / "src")
    path = convert(source=tmp_path / "src", destination=tmp_path / f"out{suffix}", to="timm")
    ref = TimmViT(**timm_kwargs(model.config)).eval()
    from vitkit.weights import read_state_dict

    ref.load_state_dict(read_state_dict(path), strict=True)
    x = torch.randn(2, 3, *model.config.img_size)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-4


def test_timm_writer_refuses_what_timm_cannot_build(tmp_path):
    model = vitkit.create_model(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, mlp_dim=64,
                                          representation_size=16))
    with pytest.raises(VitkitError, match="representation_size"):
        write_timm_state_dict(model, path=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_convert_timm_file_with_named_model(tmp_path, capsys):
    from vitkit.cli import main

    ref = timm_model(embed_dim=64, num_heads=2, patch_size=16, depth=1, num_classes=4)
    path = save(ref.state_dict(), tmp_path / "w.pth")
    # 64 is no standard width: the CLI asks for --model and says so in one line.
    assert main(["convert", str(path), str(tmp_path / "out"), "--to", "vitkit"]) == 2
    assert "model=" in capsys.readouterr().err
    vitkit.variants.register_model("test_vit_w64", "vit_tiny_patch16_224", embed_dim=64, num_heads=2, depth=1,
                                   mlp_dim=256)
    try:
        assert main(["convert", str(path), str(tmp_path / "out"), "--to", "vitkit", "--model", "test_vit_w64"]) == 0
        assert main(["info", str(path), "--model", "test_vit_w64"]) == 0
    finally:
        vitkit.variants.EXTRA_MODELS.pop("test_vit_w64")
    model = vitkit.load_pretrained(tmp_path / "out")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-4


def test_a_model_with_hf_layernorm_eps_goes_to_timm_with_a_warning(tmp_path):
    from vitkit.weights import read_state_dict

    model = randomize(vitkit.create_model(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                                    mlp_dim=64, num_classes=6, norm_eps=1e-12))).eval()
    from vitkit.convert.timm import write_timm_state_dict

    with pytest.warns(UserWarning, match="eps is 1e-12"):
        path = write_timm_state_dict(model, path=tmp_path / "w.safetensors")
    ref = TimmViT(**timm_kwargs(model.config)).eval()
    assert ref.norm.eps == ref.blocks[0].norm1.eps == 1e-12
    ref.load_state_dict(read_state_dict(path), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_a_pooling_a_timm_file_cannot_say_is_warned_about(tmp_path):
    from vitkit.convert.timm import write_timm_state_dict

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, mlp_dim=64, num_classes=5,
                       fc_norm=True)  # token pooling, then fc_norm: a timm file reads as average pooling
    model = randomize(vitkit.create_model(config)).eval()
    with pytest.warns(UserWarning, match="reads back as average pooling"):
        path = write_timm_state_dict(model, path=tmp_path / "w.safetensors")
    ref = TimmViT(**timm_kwargs(config)).eval()  # built as the warning says: the same logits
    from vitkit.weights import read_state_dict

    ref.load_state_dict(read_state_dict(path), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x))


def _timm_hub_cache(cache, repo_id, model, **model_config):
    # What timm's push_to_hf_hub uploads (config.json naming the architecture, beside the weights),
    # in the layout huggingface_hub's cache gives it: refs/main holds the commit, snapshots/<commit>/ the files.
    from timm.models._hub import save_for_hf

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    save_for_hf(model, repo / "snapshots" / commit, model_config=model_config or None, safe_serialization=True)


@pytest.mark.parametrize("name, kw", [
    ("vit_small_patch16_384.augreg_in21k_ft_in1k", dict(depth=2, embed_dim=96, num_heads=2)),
    # a pooling no tensor shows: averaged, under the plain final norm
    ("vit_tiny_patch16_224.augreg_in21k", dict(depth=2, num_classes=3, global_pool="avg", fc_norm=False)),
    ("deit_tiny_distilled_patch16_224.fb_in1k", dict(depth=1)),
])
def test_timm_hub_repository_from_the_offline_cache(tmp_path, monkeypatch, name, kw):
    ref = randomize(timm.create_model(name, pretrained=False, **kw)).eval()
    labels = [f"kind{i}" for i in range(ref.num_classes)]
    _timm_hub_cache(tmp_path / "cache", f"timm/{name}", ref, label_names=labels)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = vitkit.load_pretrained(f"hf-hub:timm/{name}")
    x = torch.randn(2, 3, *ref.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-4
    data = timm.data.resolve_data_config({}, model=ref)  # timm's eval transform: resize, centre crop, normalise
    p = model.preprocessing
    resize = timm.data.create_transform(**data).transforms[0].size  # timm's own resize, not our formula
    assert p.crop == data["input_size"][1:] and p.resize == (resize if isinstance(resize, int) else min(resize))
    assert (p.mean, p.std, p.interpolation) == (data["mean"], data["std"], data["interpolation"])
    assert model.class_names == labels


def test_a_timm_hub_config_with_arguments_vitkit_does_not_build_is_one_line(tmp_path, capsys):
    import json

    from vitkit.cli import main

    ref = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)).eval()
    _timm_hub_cache(tmp_path / "cache", "timm/odd", ref)
    config = next((tmp_path / "cache").rglob("config.json"))
    meta = json.loads(config.read_text())
    meta["model_args"]["block_fn"] = "ParallelScalingBlock"
    config.write_text(json.dumps(meta))
    assert main(["info", str(config.parent)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and "block_fn" in err
