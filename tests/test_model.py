import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit import ViTConfig, create_model
from vitkit.layers import PatchEmbed
from vitkit.model import count_flops

from conftest import randomize

TINY = dict(embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=7)


def tiny(**kw):
    return create_model(ViTConfig(**{"img_size": 32, "patch_size": 8, **TINY, **kw})).eval()


def test_patch_embed_conv_equals_flatten_and_linear():
    embed = PatchEmbed(patch_size=(4, 4), in_chans=3, embed_dim=10)
    x = torch.randn(2, 3, 8, 12)
    # The paper's form: cut patches in raster order, flatten each (C, P, P), multiply by E.
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 2, 3, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 3 * 16)  # (B, N, C*P*P)
    linear = F.linear(patches, embed.proj.weight.reshape(10, -1), embed.proj.bias)
    torch.testing.assert_close(embed(x), linear, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, published_millions", [
    ("ViT-Ti/16", 5.7), ("ViT-S/16", 22.1), ("ViT-B/16", 86.6), ("ViT-L/16", 304.3), ("ViT-H/14", 632.0)])
def test_parameter_counts_match_published(name, published_millions):
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - published_millions) < 0.05 * (1 if published_millions < 100 else 10)


def test_three_names_for_one_variant():
    a, b, c = (vitkit.variants.resolve(n) for n in ("ViT-B/16", "vit_base_patch16_224", "base"))
    assert a == b == c
    assert vitkit.variants.resolve("huge").patch_size == (14, 14)
    assert vitkit.variants.resolve("vit_large_patch32_384").img_size == (384, 384)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="vit_base_patch16_224"):
        vitkit.variants.resolve("vit_bsae_patch16_224")
    with pytest.raises(ValueError, match="did you mean ViT-B/16"):  # spelled as the table spells it
        vitkit.variants.resolve("vitb16x")
    # The right form with numbers that cannot be: a typo too, not a config error alone.
    with pytest.raises(ValueError, match=r"'vit_tiny_patch16_22': .*did you mean vit_tiny_patch16_224"):
        vitkit.variants.resolve("vit_tiny_patch16_22")


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large", "huge", "ViT-S/8", "ViT-B/32", "ViT-L/14"])
def test_every_variant_runs_at_tiny_size(name):
    # Each variant's shape logic, at a tiny width and depth so the suite stays fast.
    config = vitkit.variants.resolve(name)
    model = create_model(config.replace(embed_dim=32, num_heads=2, mlp_dim=32, depth=1, num_classes=3,
                                        img_size=config.patch_size[0] * 2)).eval()
    out = model(torch.randn(1, 3, *model.config.img_size))
    assert out.shape == (1, 3)


def test_forward_shapes_and_options():
    for kw in [dict(), dict(class_token=False, global_pool="avg"), dict(reg_tokens=4), dict(init_values=1e-5),
               dict(qk_norm=True), dict(qkv_bias=False), dict(in_chans=1), dict(representation_size=16),
               dict(img_size=(32, 48)), dict(distill_token=True)]:
        model = randomize(tiny(**kw))
        c = model.config
        x = torch.randn(2, c.in_chans, *c.img_size)
        assert model(x).shape == (2, 7), kw
        assert model.forward_features(x).shape == (2, c.num_patches + c.num_prefix_tokens, 32)


def test_fused_attention_equals_explicit_attention():
    model = randomize(tiny(depth=3))
    x = torch.randn(2, 3, 32, 32)
    fused = model.forward_intermediates(x)
    explicit = model.forward_intermediates(x, attention_layers=[0, 1, 2])
    torch.testing.assert_close(fused.features, explicit.features, atol=1e-5, rtol=1e-5)
    attn = explicit.attentions[1]
    assert attn.shape == (2, 4, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 17))
    only_last = model.forward_intermediates(x, attention_layers=[-1], indices=[0])
    assert set(only_last.attentions) == {2} and set(only_last.intermediates) == {0}


def test_forward_at_another_resolution_resamples_position_embeddings():
    model = randomize(tiny())
    out = model(torch.randn(1, 3, 64, 48))  # built for 32x32: a 8x6 grid instead of 4x4
    assert out.shape == (1, 7)
    # Resampling to the same grid is the identity; the class entry is never touched.
    same = vitkit.resample_pos_embed(model.pos_embed, old_grid=(4, 4), new_grid=(4, 4), num_prefix=1)
    assert same is model.pos_embed
    bigger = vitkit.resample_pos_embed(model.pos_embed, old_grid=(4, 4), new_grid=(8, 6), num_prefix=1,
                                       mode="bilinear")
    assert bigger.shape == (1, 1 + 48, 32)
    torch.testing.assert_close(bigger[:, 0], model.pos_embed[:, 0])


def test_resolution_matches_timm_dynamic_resampling():
    timm = pytest.importorskip("timm")
    ref = randomize(timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=64, dynamic_img_size=True)).eval()
    model = create_model("ViT-Ti/16", num_classes=5, img_size=64).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 96, 80)
    torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_same_gradients():
    model = randomize(tiny()).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_drop_path_is_identity_in_eval_and_random_in_train():
    model = randomize(tiny(drop_path_rate=0.5))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="embed_dim"):
        ViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="img_size"):
        ViTConfig(img_size=30, patch_size=16)
    with pytest.raises(ValueError, match="global_pool"):
        ViTConfig(class_token=False)
    with pytest.raises(ValueError, match="global_pool"):
        vitkit.create_model("ViT-Ti/16", class_token=False, global_pool="token")


def test_create_model_without_class_token_pools_the_patches():
    model = vitkit.create_model("ViT-Ti/16", class_token=False, num_classes=3).eval()
    x = torch.randn(2, 3, 224, 224)
    tokens = model.forward_features(x)
    assert model.config.global_pool == "avg" and tokens.shape[1] == 196
    torch.testing.assert_close(model.forward_head(tokens), model.head(model.pre_logits(model.fc_norm(tokens.mean(1)))))
    with pytest.raises(ValueError, match="unknown model config keys"):
        ViTConfig.from_dict({"embed_dimm": 3})


@pytest.mark.parametrize("field, value", [("qkv_bias", "false"), ("class_token", 1), ("fc_norm", 0), ("depth", "12"),
                                          ("init_values", "1e-5"), ("hybrid_stem", "conv"), ("num_classes", True),
                                          ("representation_size", 1.5), ("norm_eps", None)])
def test_config_json_with_the_wrong_types_is_refused(tmp_path, field, value):
    # A string "false" is truthy: unchecked, it would silently switch the option on.
    with pytest.raises(ValueError, match=f"ViTConfig.{field}"):
        ViTConfig.from_dict({field: value})
    vitkit.save_pretrained(tiny(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(vitkit.CheckpointError, match=f"config.json.*{field}"):
        vitkit.load_pretrained(tmp_path)


def test_flops_of_vit_b16():
    # 17.6 GMACs per 224 px image is the usual figure for ViT-B/16 (timm, fvcore).
    assert abs(count_flops(vitkit.variants.resolve("ViT-B/16"))["total"] / 2e9 - 17.6) < 0.2


def test_save_and_load_round_trip(tmp_path):
    model = randomize(tiny())
    model.class_names = [f"c{i}" for i in range(7)]
    model.save_pretrained(tmp_path / "m")
    loaded = vitkit.load_pretrained(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.class_names == model.class_names
    assert loaded.preprocessing == model.preprocessing
    assert loaded.config == model.config


def test_load_overrides_new_head_and_resolution(tmp_path):
    model = randomize(tiny())
    model.save_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match="freshly initialised head"):
        loaded = vitkit.load_pretrained(tmp_path / "m", num_classes=3, img_size=64)
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert loaded.pos_embed.shape == (1, 1 + 64, 32)
    with pytest.raises(vitkit.VitkitError, match="embed_dim"):
        vitkit.load_pretrained(tmp_path / "m", embed_dim=64, num_heads=4)


def test_models_command_lists_names_that_build(capsys):
    from vitkit.cli import main

    assert main(["models", "*r50*"]) == 0
    names = capsys.readouterr().out.split()
    assert "R50+ViT-B/16" in names and "vit_base_r50_s16_224" in names and "ViT-B/16" not in names
    assert all(vitkit.create_model(n, num_classes=0).config.hybrid_stem for n in names[:2])
    assert main(["models", "nothing-like-this"]) == 2


def test_a_path_wins_over_a_model_name(tmp_path, monkeypatch, capsys):
    # A run folder called "tiny" is the user's model, not a fresh ViT-Ti/16.
    from vitkit.cli import main

    vitkit.save_pretrained(tiny(), tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["info", "tiny"]) == 0
    assert "custom ViT" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "tiny" / "model.safetensors"), "--model", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--model bogus" in err and len(err.splitlines()) == 1


def test_a_closed_pipe_is_not_an_error(monkeypatch, capsys):
    # `vitkit models | head -1`: the reader leaves early; that is not a failure, and no traceback.
    from vitkit.cli import main

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["models"]) == 0
    assert capsys.readouterr().err == ""


def test_a_closed_pipe_is_not_an_error_when_stdout_is_unbuffered():
    # PYTHONUNBUFFERED leaves nothing to flush, so only the pipe can tell that its reader left.
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before vitkit prints a line
    run = subprocess.run([sys.executable, "-m", "vitkit", "info", "ViT-B/16"], stdout=write_end,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(write_end)
    assert run.returncode == 0 and run.stderr == ""


def test_config_sizes_and_stems_that_cannot_be_are_named():
    for kwargs, named in ((dict(patch_size="14"), "ViTConfig.patch_size"), (dict(img_size="64"), "ViTConfig.img_size"),
                          (dict(patch_size=(16, 16.5)), "ViTConfig.patch_size"),
                          (dict(img_size=[224, 224, 3]), "ViTConfig.img_size"),
                          (dict(hybrid_stem={"type": "conv", "stride": 0, "channels": [8]}), "'stride' must be"),
                          (dict(distill_token=True, global_pool="avg"), "needs global_pool='token'")):
        with pytest.raises(ValueError, match=re.escape(named)):
            vitkit.ViTConfig(**kwargs)
    assert vitkit.ViTConfig(img_size=np.int64(32), patch_size=8).img_size == (32, 32)  # numpy ints are ints


def test_a_new_head_takes_the_models_dtype_and_block_indices_are_checked():
    model = vitkit.create_model("tiny", depth=2, img_size=32).to(torch.bfloat16)
    model.reset_classifier(10)
    x = torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)
    assert model(x).dtype == torch.bfloat16 and model(x).shape == (1, 10)
    assert set(model.forward_intermediates(x, indices=[-1, 0]).intermediates) == {0, 1}
    with pytest.raises(ValueError, match="block index 5 is outside this model's 2 blocks"):
        model.forward_intermediates(x, indices=[5])


def test_a_distilled_models_pre_logits_are_what_its_two_heads_read():
    model = randomize(vitkit.create_model("tiny", depth=1, img_size=32, num_classes=4, distill_token=True)).eval()
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    features = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(features, (model.fc_norm(tokens[:, 0]) + model.fc_norm(tokens[:, 1])) / 2)
