import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit import ViTConfig, create_model, load_pretrained, save_pretrained
from vitkit.cli import main
from vitkit.config import Preprocessing
from vitkit.data import build_eval_loader
from vitkit.errors import VitkitError
from vitkit.images import preprocess, read_image
from vitkit.infer import evaluate, iter_predict, predict

from conftest import randomize

CLASSES = ["a_red", "b_green", "c_blue"]  # sorted, as ImageFolder orders them


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 6)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
                pixels[..., label] += 170
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def colour_model(tmp_path) -> Path:
    """A ViT whose head reads the mean colour: average pooling of patch tokens, an identity-like
    patch projection, so it classifies the dataset's dominant channel correctly."""
    model = create_model(ViTConfig(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=32,
                                   num_classes=3, class_token=False, global_pool="avg"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.patch_embed.proj.weight[:3] = torch.eye(3)[:, :, None, None].expand(3, 3, 8, 8) / 64
        model.fc_norm.weight.fill_(1.0)
        model.head.weight[:, :3] = torch.eye(3) * 5
    model.class_names = list(CLASSES)
    model.preprocessing = Preprocessing.for_size((16, 16))
    return save_pretrained(model, tmp_path / "model")


def test_evaluate_counts_match_a_manual_pass(dataset, tmp_path):
    model = randomize(create_model(ViTConfig(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                             mlp_dim=32, num_classes=3))).eval()
    loader, names, _ = build_eval_loader(str(dataset), preprocessing=model.preprocessing, batch_size=4)
    result = evaluate(model, loader, class_names=names)
    x = torch.cat([b[0] for b in loader.iterate(0)])
    y = torch.cat([b[1] for b in loader.iterate(0)])
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert result["n"] == 18 and result["top5"] == 1.0  # 3 classes: the top 5 always hold the truth
    assert result["top1"] == pytest.approx((pred == y).float().mean().item())
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 18 and confusion.sum(1).tolist() == [6, 6, 6]
    assert result["per_class"]["b_green"] == pytest.approx(confusion[1, 1] / 6)


def test_cli_eval_json_png_and_accuracy(dataset, colour_model, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", str(colour_model), "--data", str(dataset), "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 18 and result["top1"] == 1.0 and result["top5"] == 1.0 and result["skipped"] == []
    assert set(result["per_class"]) == set(CLASSES)
    png = Image.open(out / "confusion.png")
    assert png.size[0] > 300 and json.loads((out / "metrics.json").read_text())["n"] == 18
    assert main(["eval", str(colour_model), "--data", str(dataset)]) == 0
    assert "top-1 100.00%" in capsys.readouterr().out


def test_cli_eval_refuses_other_class_names(dataset, colour_model, capsys):
    (dataset / "val" / "c_blue").rename(dataset / "val" / "zzz")
    (dataset / "train" / "c_blue").rename(dataset / "train" / "zzz")
    assert main(["eval", str(colour_model), "--data", str(dataset)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'c_blue'" in err and "'zzz'" in err


def test_predict_json_lines_errors_and_exit_code(dataset, colour_model, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    inputs = [str(dataset / "val" / "a_red"), str(broken), str(dataset / "val" / "c_blue" / "*.png")]
    assert main(["predict", str(colour_model), *inputs, "--json", "--top-k", "2"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 6 + 1 + 6
    assert "broken.jpg" in lines[6]["error"] and lines[6]["path"] == str(broken)
    good = [line for line in lines if "predictions" in line]
    assert all(len(line["predictions"]) == 2 for line in good)
    assert [line["predictions"][0]["label"] for line in good] == ["a_red"] * 6 + ["c_blue"] * 6
    assert all(line["predictions"][0]["prob"] >= line["predictions"][1]["prob"] for line in good)
    assert main(["predict", str(colour_model), str(dataset / "val" / "b_green")]) == 0
    text = capsys.readouterr().out
    assert text.count(": b_green") == 6


def test_predict_uses_the_stored_preprocessing(colour_model, dataset):
    model = load_pretrained(colour_model)
    model.preprocessing = Preprocessing(resize=20, crop=(16, 16), mean=(0.4, 0.4, 0.4), std=(0.2, 0.3, 0.4))
    files = sorted((dataset / "val").glob("*/*.png"))[:3]
    results = predict(model, files, top_k=3)
    with torch.no_grad():
        probs = model(torch.stack([preprocess(read_image(f), model.preprocessing) for f in files])).softmax(1)
    for result, p in zip(results, probs):
        by_label = {r["label"]: r["prob"] for r in result["predictions"]}
        assert [by_label[c] for c in CLASSES] == pytest.approx(p.tolist(), abs=1e-5)
    with pytest.raises(VitkitError, match="top-k"):
        predict(model, files, top_k=0)
    with pytest.raises(VitkitError, match="top-k"):
        iter_predict(model, files, top_k=0)  # at the call, before any result is asked for


def test_predict_missing_inputs(colour_model, tmp_path, capsys):
    assert main(["predict", str(colour_model), str(tmp_path / "nope.png"), "--json"]) == 1
    line = json.loads(capsys.readouterr().out.strip())
    assert "no such file" in line["error"]
    assert main(["predict", str(colour_model), str(tmp_path / "nope.png")]) == 1
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'nope.png'}: error: no such file"
    (tmp_path / "empty").mkdir()
    # Beside inputs that work, a folder or pattern that yields nothing is reported, not dropped.
    image = next(colour_model.parent.rglob("*.png"), None) or _any_image(tmp_path)
    assert main(["predict", str(colour_model), str(image), str(tmp_path / "empty"), str(tmp_path / "typo*.png"),
                 "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert "predictions" in lines[0]
    assert "no images in it" in lines[1]["error"] and "matches no file" in lines[2]["error"]


def _any_image(folder):
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "red.png")
    return folder / "red.png"


def test_cli_eval_on_a_val_folder_with_some_of_the_classes(dataset, colour_model, tmp_path, capsys):
    # Only val/ (no train/), and only two of the model's three classes: scored by the model's names.
    import shutil

    part = tmp_path / "part"
    for name in ("a_red", "c_blue"):
        shutil.copytree(dataset / "val" / name, part / "val" / name)
    assert main(["eval", str(colour_model), "--data", str(part), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == sum(1 for _ in part.rglob("*.png")) and result["top1"] > 0.9
    assert result["per_class"]["b_green"] is None


def test_predict_globs_expand_folders_and_an_empty_path_is_refused(dataset, colour_model, capsys):
    pattern = str(dataset / "val" / "*")  # matches the class folders
    assert main(["predict", str(colour_model), pattern, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 18 and all("predictions" in line for line in lines)
    assert main(["predict", str(colour_model), "", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "an empty image path" in captured.err


def test_a_run_directory_without_checkpoints_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "vit_cifar", "epochs": 3}))
    assert main(["eval", str(run)]) == 2
    assert "a training run with no checkpoint yet" in capsys.readouterr().err


def test_a_one_channel_model_is_refused_in_one_line_by_every_image_command(dataset, tmp_path, capsys):
    gray = create_model(ViTConfig(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=32,
                                  num_classes=3, in_chans=1))
    path = save_pretrained(gray, tmp_path / "gray")
    image = next((dataset / "val" / "a_red").iterdir())
    for args in (["predict", str(path), str(image)], ["eval", str(path), "--data", str(dataset)],
                 ["explain", str(image), "--model", str(path), "--out", str(tmp_path / "x")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "1-channel images" in err and "\n" not in err


def test_predict_refuses_a_model_without_a_head(tmp_path, capsys):
    # An MAE encoder (num_classes = 0) returns features; it printed empty predictions and exit 0.
    model = create_model(ViTConfig(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=32,
                                   num_classes=0))
    source = save_pretrained(model, tmp_path / "encoder")
    image = _any_image(tmp_path)
    assert main(["predict", str(source), str(image), "--json"]) == 2
    captured = capsys.readouterr()
    assert "no classification head" in captured.err and "\n" not in captured.err.strip() and not captured.out


def test_per_class_accuracy_is_the_exact_fraction():
    # 1 of 6 right: 1/6 as Python computes it, not a float32 quotient (0.1666666716337204 in the JSON).
    from types import SimpleNamespace

    y = torch.tensor([0] * 6 + [1] * 2)
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 1, 1, 1, 1]), 2).float()

    class Fixed(torch.nn.Module):
        config = SimpleNamespace(num_classes=2)

        def forward(self, x):
            return logits

    loader = SimpleNamespace(device=torch.device("cpu"), iterate=lambda epoch: [(torch.zeros(8, 3, 4, 4), y)])
    result = evaluate(Fixed(), loader, class_names=["a", "b"])
    assert result["per_class"] == {"a": 1 / 6, "b": 1.0}
    assert result["top1"] == 3 / 8


def test_eval_out_that_is_a_file_fails_before_the_pass(dataset, colour_model, tmp_path, capsys, monkeypatch):
    import vitkit.infer

    out = tmp_path / "taken"
    out.write_text("keep me")
    passes = []
    monkeypatch.setattr(vitkit.infer, "evaluate", lambda *a, **k: passes.append(1))
    assert main(["eval", str(colour_model), "--data", str(dataset), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(out) in err and "\n" not in err
    assert passes == [] and out.read_text() == "keep me"  # no evaluation wasted, nothing overwritten


def test_confusion_figure_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from vitkit.infer import confusion_figure

    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")  # a notebook's or GUI's backend, as far as this test can tell
        path = confusion_figure([[3, 1], [0, 4]], ["a", "b"], tmp_path / "c.png")
        assert matplotlib.get_backend() == "svg"
        assert Image.open(path).size[0] > 300
    finally:
        matplotlib.use(before)


def test_predictions_arrive_batch_by_batch_in_order(colour_model, dataset, tmp_path, monkeypatch):
    # A big folder shows its first lines once their batch has run, not after the last image.
    import vitkit.infer as infer

    files = sorted((dataset / "val").glob("*/*.png"))[:5]
    files.insert(1, tmp_path / "missing.png")  # an error between two batched images keeps its place
    reads = []
    real = infer.read_image
    monkeypatch.setattr(infer, "read_image", lambda path: (reads.append(path), real(path))[1])
    results = iter_predict(load_pretrained(colour_model), files, top_k=1, batch_size=2)
    first = next(results)
    assert first["path"] == str(files[0]) and "predictions" in first and len(reads) == 3  # one batch of 2, and the missing file
    rest = list(results)
    assert [r["path"] for r in rest] == [str(f) for f in files[1:]] and "error" in rest[0]
    assert [first, *rest] == predict(load_pretrained(colour_model), files, top_k=1)
