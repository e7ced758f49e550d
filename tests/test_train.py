"""vitkit train: it learns, writes a usable run directory, and its recipe pieces are right."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import build_parser, main
from vitkit.errors import VitkitError
from vitkit.mixup import mix_batch
from vitkit.optim import lr_at, param_groups
from vitkit.train import TrainConfig, read_metrics, train

from conftest import randomize

# A 16-px ViT small enough that a step takes milliseconds on one core.
TINY_MODEL = dict(model="vit_cifar", model_overrides=dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64),
                  patch_size=4, img_size=16)


def make_shapes(root: Path, *, per_class: int = 40, val_per_class: int = 12, size: int = 16, seed: int = 0) -> Path:
    """Three classes of coloured shapes on noisy backgrounds, as PNGs in DIR/{train,val}/<class>/."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    colours = {"square": (220, 40, 40), "disc": (40, 200, 60), "bar": (50, 70, 230)}
    for split, count in (("train", per_class), ("val", val_per_class)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 90, (size, size, 3)).astype(np.float64)
                r = rng.integers(3, 6)
                cy, cx = rng.integers(r, size - r, 2)
                if name == "square":
                    mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
                elif name == "disc":
                    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                else:
                    mask = abs(yy - cy) <= 1
                image[mask] = np.array(colour) * rng.uniform(0.8, 1.0)
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    values = dict(TINY_MODEL, data=str(data), out=str(out), epochs=6, batch_size=24, lr=3e-3, warmup_epochs=1,
                  progress=False, seed=0)
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "shapes"
    return out, train(tiny_config(shapes, out))


def test_training_learns_shapes_far_above_chance(trained_run):
    out, summary = trained_run
    assert summary["best_val_acc"] >= 0.9  # chance is 1/3
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_run_directory_is_complete_and_loadable(trained_run, shapes):
    out, summary = trained_run
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 6 and config["recipe"] == "cifar" and config["label_smoothing"] == 0.1
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, summary["steps"] + 1))
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in steps)
    for name in ("loss.png", "accuracy.png", "lr.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600
    saved = json.loads((out / "summary.json").read_text())
    assert saved["best_val_acc"] == summary["best_val_acc"] and saved["images_per_s"] > 0
    # best/ is a vitkit checkpoint that reproduces the validation accuracy it was kept for.
    model = vitkit.load_pretrained(out / "best")
    assert model.class_names == ["bar", "disc", "square"]
    from vitkit.data import build_eval_loader

    loader, _, _ = build_eval_loader(str(shapes), preprocessing=model.preprocessing, batch_size=50)
    correct = total = 0
    with torch.no_grad():
        for x, y in loader.iterate(0):
            correct += (model(x).argmax(-1) == y).sum().item()
            total += len(y)
    assert correct / total == pytest.approx(summary["best_val_acc"], abs=1e-6)


def test_load_pretrained_finds_best_in_run_dir(trained_run):
    out, _ = trained_run
    from_run = vitkit.load_pretrained(out).state_dict()
    from_best = vitkit.load_pretrained(out / "best").state_dict()
    assert from_run.keys() == from_best.keys()
    assert all(torch.equal(from_run[k], from_best[k]) for k in from_run)


def test_grad_accum_equals_bigger_batch(shapes, tmp_path):
    common = dict(epochs=1, augment="none", label_smoothing=0.0, warmup_epochs=0, max_train=96)
    a = train(tiny_config(shapes, tmp_path / "a", batch_size=32, grad_accum=1, **common))
    b = train(tiny_config(shapes, tmp_path / "b", batch_size=16, grad_accum=2, **common))
    assert a["steps"] == b["steps"] == 3
    wa = vitkit.load_pretrained(tmp_path / "a" / "last").state_dict()
    wb = vitkit.load_pretrained(tmp_path / "b" / "last").state_dict()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=2e-6, rtol=1e-5)


def _renamed_copy(shapes: Path, root: Path, names: dict[str, str]) -> Path:
    import shutil

    for split in ("train", "val"):
        for old, new in names.items():
            shutil.copytree(shapes / split / old, root / split / new)
    return root


def test_init_keeps_the_head_only_for_the_same_classes(trained_run, tmp_path, shapes):
    # Three classes again, but other ones: the old head's rows would mean the wrong things.
    out, _ = trained_run
    old_head = vitkit.load_pretrained(out / "best").head.weight
    other = _renamed_copy(shapes, tmp_path / "other", {"bar": "cat", "disc": "dog", "square": "fox"})
    for data, name in ((shapes, "same"), (other, "other")):
        train(tiny_config(data, tmp_path / name, init=str(out / "best"), epochs=1, lr=1e-9, max_train=24))
    same, fresh = (vitkit.load_pretrained(tmp_path / name / "last") for name in ("same", "other"))
    torch.testing.assert_close(same.head.weight, old_head, atol=1e-6, rtol=0)
    assert fresh.head.weight.abs().max() < 1e-6 and fresh.class_names == ["cat", "dog", "fox"]


def test_init_with_distillation_adds_the_token(trained_run, tmp_path, shapes):
    out, _ = trained_run
    summary = train(tiny_config(shapes, tmp_path / "s", init=str(out / "best"), distill_from=str(out / "best"),
                                distill_type="hard", epochs=1))
    student = vitkit.load_pretrained(tmp_path / "s" / "best")
    assert student.config.distill_token and summary["best_val_acc"] > 0.6  # the init's knowledge kept


def test_add_distillation_token_starts_from_the_class_token():
    from vitkit.distill import add_distillation_token

    model = randomize(vitkit.create_model("vit_cifar", embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=3))
    student = add_distillation_token(model).eval()
    assert student.config.num_prefix_tokens == 2 and student.pos_embed.shape[1] == model.pos_embed.shape[1] + 1
    torch.testing.assert_close(student.dist_token, student.cls_token)
    torch.testing.assert_close(student.pos_embed[:, 1], student.pos_embed[:, 0])
    cls, dist = student.forward_distilled(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(cls, dist)  # identical tokens, identical heads


def test_distillation_weights_follow_deit():
    from vitkit.train import resolve_config

    teacher = "torchvision:resnet18"
    assert resolve_config(TrainConfig(distill_from=teacher, distill_type="soft")).distill_alpha == 0.1  # DeiT's lambda
    assert resolve_config(TrainConfig(distill_from=teacher, distill_type="hard")).distill_alpha == 0.5
    with pytest.raises(VitkitError, match="--distill-type need.* --distill-from"):
        resolve_config(TrainConfig(distill_type="soft"))  # silently ignored before
    args = build_parser().parse_args(["train", "--distill-alpha", "0.3", "--distill-tau", "2"])
    assert (args.distill_alpha, args.distill_tau) == (0.3, 2.0)
    with pytest.raises(VitkitError, match="--distill-alpha"):
        resolve_config(TrainConfig(distill_from=teacher, distill_alpha=1.5))


def test_teacher_with_the_classes_in_another_order_is_refused(trained_run, tmp_path, shapes):
    out, _ = trained_run
    teacher = vitkit.load_pretrained(out / "best")
    teacher.class_names = teacher.class_names[::-1]
    vitkit.save_pretrained(teacher, tmp_path / "teacher")
    with pytest.raises(VitkitError, match="another order"):
        train(tiny_config(shapes, tmp_path / "s", distill_from=str(tmp_path / "teacher"), epochs=1))


def test_init_options_that_cannot_apply_give_one_line_errors(trained_run, tmp_path, shapes, capsys):
    out, _ = trained_run
    base = ["train", "--init", str(out / "best"), "--data", str(shapes), "--no-progress"]
    for extra, named in ((["--patch-size", "8"], "--patch-size 8"), (["--img-size", "18"], "--img-size 18")):
        assert main(base + extra + ["--out", str(tmp_path / named[2:5])]) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and len(err.splitlines()) == 1
    (tmp_path / "file").write_text("not a directory")
    assert main(base + ["--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert "file" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_init_from_run_replaces_head_and_resamples(trained_run, tmp_path, shapes):
    out, _ = trained_run
    summary = train(TrainConfig(init=str(out / "best"), data=str(shapes), out=str(tmp_path / "ft"), img_size=32,
                                epochs=1, batch_size=24, progress=False))
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["recipe"] == "finetune" and config["layer_decay"] == 0.75
    model = vitkit.load_pretrained(tmp_path / "ft" / "best")
    assert model.config.img_size == (32, 32) and model.pos_embed.shape[1] == 1 + 8 * 8
    assert summary["best_val_acc"] > 0.6  # the pre-trained features carry over at another resolution


def test_weight_decay_groups_and_layer_decay():
    model = vitkit.create_model("vit_cifar", embed_dim=32, depth=2, num_heads=2, mlp_dim=64)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, depth=2)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            decays = group["weight_decay"] > 0
            assert decays == (p.ndim > 1 and names[id(p)] not in ("pos_embed", "cls_token")), names[id(p)]
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["head.weight"] == 1.0 and scale["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.attn.qkv.weight"] == 0.25 and scale["pos_embed"] == 0.125
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lr_schedule_warms_up_then_decays_by_cosine():
    lrs = [lr_at(s, base_lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.1) for s in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_mixup_and_cutmix_targets():
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, targets = mix_batch(x, y, num_classes=3, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.1, seed=1, step=5)
    torch.testing.assert_close(targets.sum(-1), torch.ones(6))
    lam = (mixed[0] - x[5]) / (x[0] - x[5])  # mixup: every pixel is the same blend of a sample and its mirror
    assert torch.allclose(lam, lam.flatten()[0], atol=1e-4)
    again, _ = mix_batch(x, y, num_classes=3, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.1, seed=1, step=5)
    assert torch.equal(mixed, again)
    cut, targets = mix_batch(x, y, num_classes=3, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0, seed=2, step=0)
    pasted = (cut[0] != x[0]).any(0).float().mean().item()
    assert targets[0, y[5]].item() == pytest.approx(pasted, abs=1e-6)  # the label share is the pasted area


def test_seed_command_line_parses():
    args = build_parser().parse_args(["train", "--model", "base", "--num_epochs", "10", "--batch_size", "32"])
    fields = TrainConfig.__dataclass_fields__
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    assert (config.model, config.epochs, config.batch_size) == ("base", 10, 32)


def test_train_help_documents_the_flags():
    out = subprocess.run([sys.executable, "-m", "vitkit", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--model", "--num_epochs", "--batch_size", "--epochs", "--batch-size", "--lr", "--resume", "--init",
                 "--precision", "--grad-accum", "--layer-decay", "--ema", "--mixup", "--fsdp", "--checkpoint-every",
                 "--distill-from", "--grad-checkpointing"):
        assert flag in out, flag


def test_bad_arguments_give_one_line_errors(tmp_path, capsys, shapes):
    assert main(["train", "--recipe", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--recipe 'nope'" in err and "cifar" in err and len(err.splitlines()) == 1
    assert main(["train", "--model", "vit_bsae", "--data", str(shapes), "--out", str(tmp_path / "m")]) == 2
    assert "vit_bsae" in capsys.readouterr().err


def test_distillation_from_a_trained_teacher(trained_run, shapes, tmp_path):
    teacher_dir, teacher_summary = trained_run
    out = tmp_path / "student"
    summary = train(tiny_config(shapes, out, distill_from=str(teacher_dir / "best"), distill_type="hard", epochs=4))
    student = vitkit.load_pretrained(out / "best")
    assert student.config.distill_token and student.head_dist is not None
    assert summary["best_val_acc"] >= 0.8  # the teacher scored >= 0.9; chance is 1/3


def test_bf16_with_gradient_checkpointing_trains(shapes, tmp_path):
    out = tmp_path / "bf16"
    summary = train(tiny_config(shapes, out, precision="bf16", grad_checkpointing=True, epochs=4, ema=0.9))
    assert summary["precision"] == "bf16" and summary["best_val_acc"] >= 0.6
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("flags, named", [
    (["--lr", "nan"], "--lr"), (["--img-size", "0"], "--img-size"), (["--max-train", "0"], "--max-train"),
    (["--warmup-epochs", "nan"], "--warmup-epochs"), (["--device", "bogus"], "--device"),
    (["--clip-grad", "-1"], "--clip-grad"), (["--label-smoothing", "2"], "--label-smoothing"),
    (["--weight-decay", "-5"], "--weight-decay"), (["--min-lr", "1"], "--min-lr"), (["--mixup", "-1"], "--mixup"),
    (["--workers", "-1"], "--workers"), (["--random-erasing", "1.5"], "--random-erasing"),
])
def test_values_out_of_range_are_refused_in_one_line(tmp_path, capsys, shapes, flags, named):
    # Silently accepted, a negative clip or a smoothing of 2 trains to 0% accuracy; others were tracebacks.
    assert main(["train", "--data", str(shapes), "--out", str(tmp_path / "r"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "config.json").exists()


def test_fine_tuning_resumes_without_its_init_source_from_another_directory(trained_run, tmp_path, shapes,
                                                                            monkeypatch):
    import shutil

    out, _ = trained_run
    shutil.copytree(out / "best", tmp_path / "source")
    shutil.copytree(shapes, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    train(tiny_config(Path("data"), tmp_path / "ft", init="source", epochs=1))
    shutil.rmtree(tmp_path / "source")  # gone, as a deleted download or an offline hf-hub: id would be
    monkeypatch.chdir(tmp_path / "ft")  # and resumed from elsewhere: the relative paths were made absolute
    assert train(TrainConfig(resume=str(tmp_path / "ft"), epochs=2, progress=False))["epochs"] == 2
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["init"] == str(tmp_path / "source")  # the record keeps where the weights came from
    assert build_parser().parse_args(["train", "--resume", "r", "--no-fsdp"]).fsdp is False  # FSDP -> DDP too


def test_init_carries_the_sources_normalisation_and_interpolation(trained_run, tmp_path, shapes):
    import dataclasses

    out, _ = trained_run
    source = vitkit.load_pretrained(out / "best")
    source.preprocessing = dataclasses.replace(source.preprocessing, interpolation="bilinear", mean=(0.4, 0.4, 0.4))
    vitkit.save_pretrained(source, tmp_path / "source")
    train(tiny_config(shapes, tmp_path / "ft", init=str(tmp_path / "source"), epochs=1, max_train=24))
    tuned = vitkit.load_pretrained(tmp_path / "ft" / "last").preprocessing
    assert tuned.interpolation == "bilinear" and tuned.mean == (0.4, 0.4, 0.4)


def test_init_from_a_bare_weights_file_takes_the_named_models_normalisation(tmp_path, shapes):
    # A timm DeiT file says nothing of its normalisation; --model deit_* does (ImageNet's), and the
    # data must be prepared that way, as load_pretrained and predict prepare it.
    from safetensors.torch import save_file

    name = "deit_tiny_patch16_224"
    model = vitkit.create_model(name, num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "deit.safetensors")
    config = tiny_config(shapes, tmp_path / "ft", init=str(tmp_path / "deit.safetensors"), epochs=1, max_train=24,
                         model=name, model_overrides=None, patch_size=None, img_size=32)
    train(config)
    tuned = vitkit.load_pretrained(tmp_path / "ft" / "last").preprocessing
    assert tuned.mean == model.preprocessing.mean != (0.5, 0.5, 0.5)


def test_plots_leave_the_callers_matplotlib_backend_alone(trained_run):
    import matplotlib

    from vitkit.plots import plot_run

    out, _ = trained_run
    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # as a notebook or GUI would have its own
    try:
        paths = plot_run(out)
        assert matplotlib.get_backend() == "pdf" and all(p.stat().st_size > 1000 for p in paths)
    finally:
        matplotlib.use(before)


def test_the_model_a_run_builds_is_the_one_it_records():
    from vitkit.train import resolve_config

    for recipe in ("finetune", "deit"):  # recipes without a model of their own
        assert resolve_config(TrainConfig(recipe=recipe)).model == "vit_cifar"
    assert resolve_config(TrainConfig(init="some-run")).model is None  # the checkpoint says it


def test_a_missing_init_or_teacher_names_its_flag(shapes, tmp_path, capsys):
    for flag in ("--init", "--distill-from"):
        assert main(["train", "--data", str(shapes), flag, str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                     "--epochs", "1", "--batch-size", "16", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"error: {flag}: {tmp_path / 'nowhere'}: no such file" in err and "\n" not in err
        assert not (tmp_path / "r").exists()
