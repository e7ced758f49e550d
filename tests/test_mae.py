import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit import ViTConfig, create_model
from vitkit.cli import main
from vitkit.mae import MaskedAutoencoder, patchify, pretrain_mae, random_masking, unpatchify

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=0)


def _mae(**kw):
    return MaskedAutoencoder(create_model(ViTConfig(**TINY)), decoder_dim=32, decoder_depth=1, decoder_heads=2, **kw)


def test_patchify_follows_patch_embed_raster_order_and_inverts():
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, (4, 4))  # (2, 6, 48)
    # Patch n = (row n // 3, column n % 3), pixels in (P, Q, C) order.
    torch.testing.assert_close(patches[1, 4], x[1, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(patches, (4, 4), (2, 3)), x)


@pytest.mark.parametrize("ratio, keep", [(0.75, 16), (0.5, 32), (0.9, 6)])
def test_masking_keeps_exactly_the_requested_fraction(ratio, keep):
    g = torch.Generator().manual_seed(1)
    kept, mask, restore = random_masking(8, 64, mask_ratio=ratio, generator=g)
    assert kept.shape == (8, keep)
    assert (mask.sum(1) == 64 - keep).all()  # every image hides the same count
    for b in range(8):
        assert len(set(kept[b].tolist())) == keep and not mask[b, kept[b]].any()
    # What the decoder relies on: [visible..., mask tokens...] gathered by restore puts each visible
    # token back at its own raster position and a mask token at every hidden one.
    sequence = torch.cat([kept, torch.full((8, 64 - keep), -1)], dim=1)
    placed = torch.gather(sequence, 1, restore)
    raster = torch.arange(64).expand(8, -1)
    assert (placed[~mask] == raster[~mask]).all() and (placed[mask] == -1).all()
    assert not all(torch.equal(kept[0].sort().values, kept[b].sort().values) for b in range(1, 8))  # per sample
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 64, mask_ratio=1.0)


def test_encoder_sees_only_visible_patches():
    mae = _mae().eval()
    x = torch.randn(2, 3, 16, 16)
    keep, mask, _ = random_masking(2, 16, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert mae.forward_encoder(x, keep).shape == (2, 1 + 4, 32)
    # Changing every hidden patch leaves the encoder's output untouched.
    noise = unpatchify(torch.randn(2, 16, 48) * mask.unsqueeze(-1), (4, 4), (4, 4))
    torch.testing.assert_close(mae.forward_encoder(x + noise, keep), mae.forward_encoder(x, keep))
    loss, pred, mask2 = mae(x)
    assert pred.shape == (2, 16, 48) and mask2.sum() == 2 * 12 and loss.ndim == 0


def _gradient_images(n, seed=0):
    """Each image: a random colour plus a random linear ramp. A patch's normalised pixels are then
    the image's ramp direction, which the visible patches reveal: reconstruction is learnable."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    angle = torch.rand(n, generator=g) * 2 * torch.pi
    ramp = torch.cos(angle).view(n, 1, 1) * xx + torch.sin(angle).view(n, 1, 1) * yy  # (n, 16, 16)
    colour = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    return colour * ramp.unsqueeze(1) + 0.05 * torch.randn(n, 3, 16, 16, generator=g)


def test_reconstruction_loss_falls_on_masked_patches():
    mae = _mae().train()
    x = _gradient_images(64)
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    losses = []
    for step in range(80):
        loss, _, _ = mae(x[(step * 16) % 64:(step * 16) % 64 + 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # Predicting zeros (the mean of a normalised patch) scores 1.0: the model must beat it clearly.
    assert last < 0.8 * first and last < 0.85, (first, last)


def test_hybrid_stem_is_refused():
    spec = {"type": "conv", "stride": 2, "channels": [8], "strides": [2], "norm": "batch"}
    with pytest.raises(vitkit.VitkitError, match="hybrid"):
        MaskedAutoencoder(create_model(ViTConfig(**{**TINY, "patch_size": 2}, hybrid_stem=spec)))


def _write_folder(root, n_train=48, n_val=8):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_pretrain_cli_writes_encoder_figures_and_metrics(tmp_path, capsys):
    _write_folder(tmp_path / "data")
    out = tmp_path / "run"
    code = main(["pretrain", "--method", "mae", "--model", "vit_cifar", "--img-size", "16", "--patch-size", "4",
                 "--data", str(tmp_path / "data"), "--epochs", "2", "--batch-size", "16", "--decoder-depth", "1",
                 "--decoder-dim", "32", "--device", "cpu", "--out", str(out)])
    assert code == 0
    assert "epoch 2/2" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(np.isfinite(r["val_loss"]) for r in records)
    assert Image.open(out / "reconstructions" / "epoch_002.png").size[0] > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * summary["train_images"] // 16 and summary["final_val_loss"] == records[-1]["val_loss"]
    encoder = vitkit.load_pretrained(out)  # RUN/last: a plain VisionTransformer, no head
    assert isinstance(encoder, vitkit.VisionTransformer) and encoder.config.num_classes == 0
    assert encoder.config.img_size == (16, 16)
    with pytest.warns(UserWarning, match="freshly initialised head"):
        classifier = vitkit.load_pretrained(out, num_classes=2)  # what fine-tuning starts from
    assert classifier(torch.randn(1, 3, 16, 16)).shape == (1, 2)


def test_pretrain_bad_arguments(tmp_path):
    assert main(["pretrain", "--model", "vit_nonexistent", "--out", str(tmp_path / "r")]) == 2
    with pytest.raises(vitkit.VitkitError, match="mask-ratio"):
        pretrain_mae(model=ViTConfig(**TINY), out=tmp_path / "r", mask_ratio=1.0)
    for kwargs, named in ((dict(decoder_heads=0), "--decoder-heads must be at least 1 (got 0)"),
                          (dict(decoder_dim=0), "--decoder-dim must be at least 1"),
                          (dict(decoder_depth=-1), "--decoder-depth must be at least 1"),
                          (dict(max_train=0), "--max-train must be at least 1"),
                          (dict(decoder_dim=30, decoder_heads=4), "--decoder-dim 30 must be divisible by --decoder-heads 4"),
                          (dict(lr=-1.0), "--lr must be positive"), (dict(lr=float("nan")), "--lr must be positive"),
                          (dict(warmup_epochs=-3), "--warmup-epochs must be at least 0")):
        with pytest.raises(vitkit.VitkitError, match=re.escape(named)):
            pretrain_mae(model=ViTConfig(**TINY), out=tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()


def test_pretraining_a_classifier_drops_its_head(tmp_path):
    _write_folder(tmp_path / "data")
    classifier = vitkit.create_model(ViTConfig(**{**TINY, "num_classes": 5}))
    result = pretrain_mae(model=classifier, out=tmp_path / "r", data=str(tmp_path / "data"), epochs=1,
                          batch_size=16, decoder_depth=1, decoder_dim=32, device="cpu", log=False)
    assert vitkit.load_pretrained(result.run_dir).config.num_classes == 0


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_pretrain_reads_images_in_any_layout(tmp_path, kind):
    # MAE needs no labels: loose images in nested folders (or an archive of them) are a dataset.
    import zipfile

    rng = np.random.default_rng(0)
    root = tmp_path / "loose"
    for i in range(42):
        folder = root / ("a" if i % 3 else "a/b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    data = root
    if kind == "zip":
        data = tmp_path / "loose.zip"
        with zipfile.ZipFile(data, "w") as archive:
            for path in root.rglob("*"):
                if path.is_file():
                    archive.write(path, path.relative_to(tmp_path))
    result = pretrain_mae(model=ViTConfig(**TINY), data=str(data), out=tmp_path / "run", epochs=1, batch_size=8,
                          decoder_dim=32, decoder_depth=1, log=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_images"] == 40  # 2 of 42 held out for the validation loss
    assert np.isfinite(result.val_loss[-1])


def test_pretrain_keeps_an_existing_run(tmp_path):
    _write_folder(tmp_path / "data")
    kw = dict(model=ViTConfig(**TINY), data=str(tmp_path / "data"), out=tmp_path / "run", epochs=1, batch_size=8,
              decoder_dim=32, decoder_depth=1, log=False)
    pretrain_mae(**kw)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(vitkit.VitkitError, match="already holds"):
        pretrain_mae(**kw)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_pretrain_resume_gives_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    import vitkit.checkpoint as checkpoint_module
    from vitkit.weights import read_state_dict

    _write_folder(tmp_path / "data")
    kw = dict(model=ViTConfig(**TINY), data=str(tmp_path / "data"), epochs=3, batch_size=8, decoder_dim=32,
              decoder_depth=1, log=False)
    pretrain_mae(out=tmp_path / "ref", **kw)

    class Killed(BaseException):
        pass

    real, saves = checkpoint_module.save_checkpoint, []

    def dies_after_two(*args, **kwargs):  # the process dies right after epoch 2's checkpoint
        saves.append(real(*args, **kwargs))
        if len(saves) == 2:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "save_checkpoint", dies_after_two)
        with pytest.raises(Killed):
            pretrain_mae(out=tmp_path / "run", **kw)
    with pytest.raises(vitkit.VitkitError, match="--resume"):
        pretrain_mae(out=tmp_path / "run", **kw)  # a fresh start would overwrite it
    assert main(["pretrain", "--resume", str(tmp_path / "run"), "--device", "cpu"]) == 0
    got, want = (read_state_dict(tmp_path / name / "last" / "model.safetensors") for name in ("run", "ref"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert main(["pretrain", "--resume", str(tmp_path / "run"), "--data", "elsewhere"]) == 2
    assert "--data cannot change" in capsys.readouterr().err


def test_pretrain_resume_refuses_settings_it_would_ignore(tmp_path, capsys):
    _write_folder(tmp_path / "data")
    pretrain_mae(model=ViTConfig(**TINY), data=str(tmp_path / "data"), out=tmp_path / "run", epochs=1, batch_size=8,
                 decoder_dim=32, decoder_depth=1, log=False)
    before = (tmp_path / "run" / "pretrain.json").read_text()
    for flag, value in (("--mask-ratio", "0.5"), ("--batch-size", "4"), ("--lr", "1e-3"), ("--seed", "1")):
        assert main(["pretrain", "--resume", str(tmp_path / "run"), "--epochs", "2", flag, value]) == 2
        assert f"{flag} cannot change" in capsys.readouterr().err
    assert (tmp_path / "run" / "pretrain.json").read_text() == before


def test_pretrain_model_may_be_an_hf_hub_id(tmp_path, monkeypatch, capsys):
    import vitkit.cli

    asked = []

    def fake_load(source, **_):
        asked.append(source)
        return create_model(ViTConfig(**TINY))

    monkeypatch.setattr(vitkit.cli, "load_or_create", fake_load)
    # --epochs 0 stops the run right after the model is built.
    assert main(["pretrain", "--model", "hf-hub:org/vit", "--out", str(tmp_path / "r"), "--epochs", "0"]) == 2
    assert asked == ["hf-hub:org/vit"] and "--epochs must be at least 1" in capsys.readouterr().err
