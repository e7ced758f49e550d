"""HuggingFace transformers ViT / DeiT in and out: same logits as transformers' own models, offline."""

import json
import shutil

import pytest
import torch

import vitkit
from vitkit import CheckpointError, ViTConfig, VitkitError
from vitkit.convert import convert
from vitkit.convert.hf import write_hf_dir

from conftest import randomize

transformers = pytest.importorskip("transformers")


def hf_vit(cls_name="ViTForImageClassification", **kw):
    args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8, num_labels=5)
    args.update(kw)
    config_cls = transformers.DeiTConfig if cls_name.startswith("DeiT") else transformers.ViTConfig
    return randomize(getattr(transformers, cls_name)(config_cls(**args))).eval()


def logits(model, x):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


@pytest.mark.parametrize("kw", [
    dict(),
    dict(patch_size=4, hidden_size=48, num_attention_heads=3, intermediate_size=96),
    dict(qkv_bias=False, layer_norm_eps=1e-6),
    dict(num_channels=1),
    dict(image_size=[32, 48]),
], ids=["plain", "patch4_width48", "no_qkv_bias_eps1e-6", "one_channel", "non_square"])
def test_hf_vit_directory_gives_hf_logits(tmp_path, kw):
    ref = hf_vit(**kw)
    ref.save_pretrained(tmp_path / "hf")
    model = vitkit.load_pretrained(tmp_path / "hf")
    size = kw.get("image_size", [32, 32])
    x = torch.randn(2, kw.get("num_channels", 3), *size)
    assert (model(x) - logits(ref, x)).abs().max() <= 1e-4
    assert model.config.norm_eps == kw.get("layer_norm_eps", 1e-12)  # HF's default eps, carried through


def test_pytorch_model_bin_class_names_and_preprocessing(tmp_path):
    ref = hf_vit(id2label={i: f"kind{i}" for i in range(5)}, label2id={f"kind{i}": i for i in range(5)})
    ref.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "hf" / "model.safetensors"), tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 3, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    model = vitkit.load_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    assert (model(x) - logits(ref, x)).abs().max() <= 1e-4
    assert model.class_names == [f"kind{i}" for i in range(5)]
    assert model.preprocessing.mean == (0.485, 0.456, 0.406) and model.preprocessing.interpolation == "bicubic"


def test_default_labels_give_no_class_names(tmp_path):
    hf_vit().save_pretrained(tmp_path / "hf")
    assert vitkit.load_pretrained(tmp_path / "hf").class_names is None


def test_hf_deit_with_teacher(tmp_path):
    ref = hf_vit("DeiTForImageClassificationWithTeacher")
    ref.save_pretrained(tmp_path / "deit")
    model = vitkit.load_pretrained(tmp_path / "deit")
    x = torch.randn(2, 3, 32, 32)
    assert model.config.distill_token
    assert (model(x) - logits(ref, x)).abs().max() <= 1e-4


def test_hf_vit_model_pooler_is_the_pre_logits_layer(tmp_path):
    ref = hf_vit("ViTModel")
    ref.save_pretrained(tmp_path / "bare")
    model = vitkit.load_pretrained(tmp_path / "bare")
    x = torch.randn(2, 3, 32, 32)
    assert model.config.num_classes == 0 and model.config.representation_size == 32
    assert (model(x) - logits(ref, x)).abs().max() <= 1e-4


def _fake_hub_cache(cache, repo_id, files_from):
    # The layout huggingface_hub itself writes: refs/main holds the commit, snapshots/<commit>/ the files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)


def test_hf_hub_id_from_the_offline_cache(tmp_path, monkeypatch):
    ref = hf_vit()
    ref.save_pretrained(tmp_path / "hf")
    _fake_hub_cache(tmp_path / "cache", "someorg/tiny-vit", tmp_path / "hf")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = vitkit.load_pretrained("hf-hub:someorg/tiny-vit")
    x = torch.randn(1, 3, 32, 32)
    assert (model(x) - logits(ref, x)).abs().max() <= 1e-4
    with pytest.raises(CheckpointError, match="hf-hub:someorg/absent.*not in the local HuggingFace cache"):
        vitkit.load_pretrained("hf-hub:someorg/absent")


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=False, norm_eps=1e-12, patch_size=4, in_chans=1),
                                dict(img_size=(32, 48))], ids=["plain", "no_bias_eps_patch4_gray", "non_square"])
def test_vitkit_to_hf_gives_same_logits_in_transformers(tmp_path, kw):
    model = randomize(vitkit.create_model(ViTConfig(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                                       "num_heads": 4, "mlp_dim": 64, "num_classes": 3, **kw}))).eval()
    model.class_names = ["cat", "dog", "eel"]
    model.save_pretrained(tmp_path / "src")
    convert(source=tmp_path / "src", destination=tmp_path / "hf", to="hf")
    ref = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, model.config.in_chans, *model.config.img_size)
    assert (model(x) - logits(ref, x)).abs().max() <= 1e-4
    assert ref.config.id2label[2] == "eel" and ref.config.layer_norm_eps == model.config.norm_eps
    again = vitkit.load_pretrained(tmp_path / "hf")  # and back: the same model
    assert (again(x) - model(x)).abs().max() <= 1e-5 and again.class_names == model.class_names


def test_vitkit_deit_to_hf(tmp_path):
    model = randomize(vitkit.create_model(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4,
                                                    mlp_dim=64, num_classes=3, distill_token=True))).eval()
    write_hf_dir(model, directory=tmp_path / "deit")
    ref = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "deit").eval()
    x = torch.randn(2, 3, 32, 32)
    assert (model(x) - logits(ref, x)).abs().max() <= 1e-4


@pytest.mark.parametrize("kw, what", [(dict(class_token=False, global_pool="avg"), "average pooling"),
                                      (dict(reg_tokens=2), "register tokens"), (dict(qk_norm=True), "qk-norm")])
def test_hf_writer_refuses_what_hf_cannot_express(tmp_path, kw, what):
    model = vitkit.create_model(ViTConfig(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1,
                                             "num_heads": 4, "mlp_dim": 64, **kw}))
    with pytest.raises(VitkitError, match=what):
        write_hf_dir(model, directory=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_broken_hf_directories_are_named(tmp_path):
    hf_vit().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="2 encoder layers"):
        vitkit.load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act"):
        vitkit.load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="without weights"):
        vitkit.load_pretrained(tmp_path / "hf")


def test_cli_info_and_convert_on_hf_directories(tmp_path, capsys):
    from vitkit.cli import main

    hf_vit(id2label={i: f"kind{i}" for i in range(5)}, label2id={f"kind{i}": i for i in range(5)}).save_pretrained(tmp_path / "hf")
    assert main(["info", str(tmp_path / "hf")]) == 0
    assert "kind0, kind1" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="LayerNorm eps is 1e-12"):  # HF's eps; timm files cannot carry it
        assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "w.safetensors"), "--to", "timm"]) == 0
    assert main(["info", str(tmp_path / "w.safetensors")]) == 2  # width 32: the head count must be named
    assert "--model" in capsys.readouterr().err
    avg = vitkit.create_model(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, mlp_dim=64,
                                        class_token=False, global_pool="avg"))
    avg.save_pretrained(tmp_path / "avg")
    assert main(["convert", str(tmp_path / "avg"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "average pooling" in err and err.count("\n") == 1


def test_hf_weights_missing_a_layer_key_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_vit().save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    del state["vit.encoder.layer.1.attention.attention.key.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"hf.*vit\.encoder\.layer\.1\.attention\.attention\.key\.weight"):
        vitkit.load_pretrained(tmp_path / "hf")


def test_hf_image_processor_is_followed_on_non_square_images(tmp_path):
    # ViTImageProcessor resizes straight to 32x32 (no crop, aspect not kept): vitkit's predict must
    # give HF's pixels on a 48x40 photo, not a shorter-side resize and crop.
    import numpy as np
    from PIL import Image

    from vitkit.images import preprocess

    ref = hf_vit()
    ref.save_pretrained(tmp_path / "hf")
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, resample=2,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path / "hf")
    model = vitkit.load_pretrained(tmp_path / "hf")
    assert model.preprocessing.resize_mode == "exact"
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    theirs = processor(photo, return_tensors="pt")["pixel_values"][0]
    ours = preprocess(photo, model.preprocessing)
    assert ours.shape == theirs.shape and (ours - theirs).abs().mean() < 0.02  # resampling filters differ slightly
    vitkit.save_pretrained(model, tmp_path / "ours")  # the mode survives vitkit's own format
    assert vitkit.load_pretrained(tmp_path / "ours").preprocessing.resize_mode == "exact"


def test_download_fetches_the_bin_only_without_safetensors_and_never_lists_the_repo(tmp_path, monkeypatch):
    # Many Hub repos hold both weight files; fetching both would double the download. Nor may it
    # ask the Hub for a listing first: with no network that costs ~23 s of retries before the
    # cache is used.
    import fnmatch

    import huggingface_hub

    from vitkit.convert.hf import download_hf_hub

    repos = {"org/both": ["config.json", "model.safetensors", "pytorch_model.bin"],
             "org/old": ["config.json", "pytorch_model.bin"]}

    def snapshot_download(repo_id, *, allow_patterns, local_files_only, cache_dir):
        folder = tmp_path / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        for name in repos[repo_id]:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (folder / name).write_text("")
        return str(folder)

    def list_repo_files(*args, **kwargs):
        raise AssertionError("the repository was listed")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    assert sorted(p.name for p in download_hf_hub("org/both").iterdir()) == ["config.json", "model.safetensors"]
    assert "pytorch_model.bin" in {p.name for p in download_hf_hub("org/old").iterdir()}


def test_a_classifier_file_with_pooler_weights_gives_hf_logits(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = hf_vit()
    ref.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["vit.pooler.dense.weight"], state["vit.pooler.dense.bias"] = torch.randn(32, 32) * 0.2, torch.randn(32)
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    x = torch.randn(2, 3, 32, 32)
    reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    model = vitkit.load_pretrained(tmp_path / "hf")
    assert model.config.representation_size is None  # HF's classifier has no pooler either
    assert (model(x) - logits(reloaded, x)).abs().max() <= 1e-4


def test_old_style_processor_sizes_as_plain_ints(tmp_path):
    hf_vit("DeiTForImageClassificationWithTeacher").save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "size": 36, "do_center_crop": True, "resample": 3,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    pre = vitkit.load_pretrained(tmp_path / "hf").preprocessing
    assert (pre.resize, pre.crop, pre.interpolation) == (36, (32, 32), "bicubic")


def test_hf_deit_processor_stretches_then_crops_as_hf_does(tmp_path):
    import numpy as np
    from PIL import Image

    from vitkit.images import preprocess

    hf_vit("DeiTForImageClassificationWithTeacher").save_pretrained(tmp_path / "hf")
    processor = transformers.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                                                do_center_crop=True, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path / "hf")
    model = vitkit.load_pretrained(tmp_path / "hf")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 30, 3), dtype=np.uint8))
    theirs = processor(photo, return_tensors="pt")["pixel_values"][0]
    ours = preprocess(photo, model.preprocessing)
    assert ours.shape == theirs.shape and (ours - theirs).abs().mean() < 0.02  # resampling filters differ slightly
    write_hf_dir(model, directory=tmp_path / "back")  # and it goes back to HF as it came
    back = json.loads((tmp_path / "back" / "preprocessor_config.json").read_text())
    assert (back["size"], back["crop_size"], back["do_center_crop"]) == (processor.size, processor.crop_size, True)
    vitkit.pretrained.set_img_size(model, 64)  # the stretch keeps its proportion to the crop: 80 then 64
    assert model.preprocessing.resized_size(60, 30) == (80, 80) and model.preprocessing.crop == (64, 64)


def test_exact_resizes_saved_before_the_stretch_mode_read_as_they_did():
    from vitkit.config import Preprocessing

    # An HF ViT model resampled to 384 px was saved as resize 439, crop 384, "exact": straight to 384.
    old = Preprocessing.from_dict({"resize": 439, "crop": [384, 384], "interpolation": "bilinear",
                                   "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "exact"})
    assert old.resized_size(500, 375) == (384, 384)
