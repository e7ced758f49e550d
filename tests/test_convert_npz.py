"""JAX .npz in and out: our writer's files load in timm's own npz loader with the same logits, and
big_vision files built by hand from timm weights load in vitkit with timm's logits."""

import numpy as np
import pytest
import torch

import vitkit
from vitkit import CheckpointError, ViTConfig, VitkitError
from vitkit.convert.jax_npz import read_npz_checkpoint, write_npz
from vitkit.pretrained import build_from_checkpoint
from vitkit.convert.timm import timm_kwargs

from conftest import randomize

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT, _load_weights  # noqa: E402


def tiny(**kw):
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_dim": 64,
            "num_classes": 5, **kw}
    return randomize(vitkit.create_model(ViTConfig(**args))).eval()


def close(a, b):
    with torch.no_grad():
        return (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kw", [
    dict(),
    dict(patch_size=4, embed_dim=48, num_heads=3, mlp_dim=96),
    dict(class_token=False, global_pool="avg", fc_norm=False),
    dict(qkv_bias=False),
    dict(in_chans=1, img_size=(32, 48)),
], ids=["plain", "patch4_width48", "gap_no_class_token", "no_qkv_bias", "gray_non_square"])
def test_written_npz_loads_in_timm_and_back_in_vitkit(tmp_path, kw):
    model = tiny(**kw)
    path = write_npz(model, path=tmp_path / "vit.npz")
    # timm's loader always copies q/k/v biases: a bias-free model travels with zero biases.
    ref = TimmViT(**{**timm_kwargs(model.config), "qkv_bias": True}).eval()
    _load_weights(ref, str(path))
    x = torch.randn(2, model.config.in_chans, *model.config.img_size)
    assert close(model(x), ref(x))
    if "img_size" in kw:
        # A non-square grid is not recoverable from the length: the caller names the size.
        with pytest.raises(CheckpointError, match="not a square grid"):
            vitkit.load_pretrained(path)
        config, state, extras = read_npz_checkpoint(path, base=ViTConfig(img_size=(32, 48)))
        back = build_from_checkpoint(config, state, extras, source=str(path))
    else:
        back = vitkit.load_pretrained(path)
    assert close(back(x), model(x))
    assert back.config.norm_eps == 1e-6 and back.config.num_heads == model.config.num_heads


def test_pre_logits_and_training_checkpoint_prefix(tmp_path):
    model = tiny(representation_size=24)
    write_npz(model, path=tmp_path / "a.npz")
    arrays = dict(np.load(tmp_path / "a.npz"))
    # A training checkpoint: the model under opt/target/, the optimizer's state beside it.
    np.savez(tmp_path / "train.npz", **{f"opt/target/{k}": v for k, v in arrays.items()},
             **{"opt/state/step": np.zeros(1)})
    loaded = vitkit.load_pretrained(tmp_path / "train.npz")
    x = torch.randn(2, 3, 32, 32)
    assert loaded.config.representation_size == 24 and close(loaded(x), model(x))


def _big_vision_npz(ref, path, *, scan):
    """A big_vision checkpoint of timm model `ref`, laid out by hand: params/ prefix, pos_embedding
    without a [class] entry, blocks LayerNorm_0 / MultiHeadDotProductAttention_0 / LayerNorm_1 /
    MlpBlock_0, stacked along a leading depth axis when `scan`."""
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    D, H = ref.embed_dim, ref.blocks[0].attn.num_heads
    out = {"params/embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "params/embedding/bias": sd["patch_embed.proj.bias"], "params/pos_embedding": sd["pos_embed"],
           "params/Transformer/encoder_norm/scale": sd["norm.weight"],
           "params/Transformer/encoder_norm/bias": sd["norm.bias"],
           "params/head/kernel": sd["head.weight"].T, "params/head/bias": sd["head.bias"]}
    if "cls_token" in sd:
        out["params/cls"] = sd["cls_token"]
    blocks = []
    for i in range(len(ref.blocks)):
        b = f"blocks.{i}."
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        block = {"LayerNorm_0/scale": sd[b + "norm1.weight"], "LayerNorm_0/bias": sd[b + "norm1.bias"],
                 "LayerNorm_1/scale": sd[b + "norm2.weight"], "LayerNorm_1/bias": sd[b + "norm2.bias"],
                 "MultiHeadDotProductAttention_0/out/kernel": sd[b + "attn.proj.weight"].T.reshape(H, D // H, D),
                 "MultiHeadDotProductAttention_0/out/bias": sd[b + "attn.proj.bias"]}
        for j, n in enumerate(("query", "key", "value")):
            block[f"MultiHeadDotProductAttention_0/{n}/kernel"] = qkv_w[j * D:(j + 1) * D].T.reshape(D, H, D // H)
            block[f"MultiHeadDotProductAttention_0/{n}/bias"] = qkv_b[j * D:(j + 1) * D].reshape(H, D // H)
        for j in (0, 1):
            block[f"MlpBlock_0/Dense_{j}/kernel"] = sd[b + f"mlp.fc{j + 1}.weight"].T
            block[f"MlpBlock_0/Dense_{j}/bias"] = sd[b + f"mlp.fc{j + 1}.bias"]
        blocks.append(block)
    if scan:
        out.update({f"params/Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        out.update({f"params/Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    np.savez(path, **out)
    return path


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "numbered"])
@pytest.mark.parametrize("kw", [dict(), dict(class_token=False, global_pool="avg", fc_norm=False, patch_size=4)],
                         ids=["token", "gap"])
def test_big_vision_npz_gives_timm_logits(tmp_path, scan, kw):
    ref = randomize(TimmViT(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4,
                               "num_classes": 5, "no_embed_class": True, **kw})).eval()
    path = _big_vision_npz(ref, tmp_path / "bv.npz", scan=scan)
    model = vitkit.load_pretrained(path)
    x = torch.randn(2, 3, 32, 32)
    assert close(model(x), ref(x))
    assert not model.config.prefix_pos_embed or not model.config.class_token
    # The hand-made layout is big_vision's as timm reads it: timm's loader gives the same model.
    peer = TimmViT(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4,
                      "num_classes": 5, "no_embed_class": True, **kw}).eval()
    _load_weights(peer, str(path))
    assert close(peer(x), ref(x))


def test_convert_cli_path_to_npz_and_info(tmp_path, capsys):
    from vitkit.cli import main

    tiny().save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out.npz"), "--to", "npz"]) == 0
    assert main(["info", str(tmp_path / "out.npz")]) == 0
    assert "heads        4 x 8" in capsys.readouterr().out


def test_npz_writer_refuses_what_the_layout_cannot_express(tmp_path):
    for kw, what in [(dict(reg_tokens=2), "register tokens"), (dict(init_values=1e-4), "LayerScale"),
                     (dict(global_pool="avg"), "fc_norm")]:
        with pytest.raises(VitkitError, match=what):
            write_npz(tiny(**kw), path=tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_broken_npz_files_are_named(tmp_path):
    write_npz(tiny(), path=tmp_path / "a.npz")
    arrays = dict(np.load(tmp_path / "a.npz"))
    missing = {k: v for k, v in arrays.items() if k != "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError, match=r"missing.npz.*encoderblock_1/MlpBlock_3/Dense_0/bias"):
        vitkit.load_pretrained(tmp_path / "missing.npz")
    np.savez(tmp_path / "extra.npz", **arrays, **{"Transformer/unknown/kernel": np.zeros(2)})
    with pytest.raises(CheckpointError, match="Transformer/unknown/kernel"):
        vitkit.load_pretrained(tmp_path / "extra.npz")
    np.savez(tmp_path / "map.npz", **arrays, **{"MAPHead_0/probe": np.zeros((1, 1, 32))})
    with pytest.raises(CheckpointError, match="MAP"):
        vitkit.load_pretrained(tmp_path / "map.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a JAX ViT checkpoint"):
        vitkit.load_pretrained(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled"):
        vitkit.load_pretrained(tmp_path / "pickled.npz")


def test_convert_to_npz_wants_the_suffix(tmp_path, capsys):
    from vitkit.cli import main

    tiny().save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "npz"]) != 0
    assert "out.npz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_never_writes_over_its_source(tmp_path, capsys):
    from vitkit.cli import main

    tiny().save_pretrained(tmp_path / "src")
    before = (tmp_path / "src" / "config.json").read_text()
    weights = (tmp_path / "src" / "model.safetensors").read_bytes()
    (tmp_path / "src" / "best").mkdir()
    (tmp_path / "src" / "best" / "config.json").write_text(before)  # as a run's RUN/best
    for destination, to in (("src", "hf"), ("src/model.safetensors", "timm"), ("src/best", "vitkit")):
        assert main(["convert", str(tmp_path / "src"), str(tmp_path / destination), "--to", to]) == 2
        assert "overlaps the source" in capsys.readouterr().err
    assert (tmp_path / "src" / "config.json").read_text() == before
    assert (tmp_path / "src" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "src" / "best" / "config.json").read_text() == before
    # New files beside the source's own are no overlap.
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "src" / "timm.safetensors"), "--to", "timm"]) == 0


def test_convert_takes_a_model_name_as_info_and_export_do(tmp_path):
    from vitkit.cli import main

    assert main(["convert", "vit_cifar", str(tmp_path / "fresh.npz"), "--to", "npz"]) == 0
    assert vitkit.load_pretrained(tmp_path / "fresh.npz").config.embed_dim == vitkit.create_model("vit_cifar").config.embed_dim
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x.npz"), "--to", "npz"]) == 2


def test_an_eps_the_npz_layout_cannot_say_is_warned(tmp_path):
    model = vitkit.create_model(ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                                          norm_eps=1e-12))  # as read from an HF checkpoint
    with pytest.warns(UserWarning, match="LayerNorm eps is 1e-12"):
        write_npz(model, path=tmp_path / "hf.npz")
    assert read_npz_checkpoint(tmp_path / "hf.npz")[0].norm_eps == 1e-6
