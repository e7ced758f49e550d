import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vitkit.cli import main
from vitkit.time_to_accuracy import Recipe, run_cifar10

TINY = {"embed_dim": 32, "num_heads": 2, "mlp_dim": 32, "depth": 1,
        "hybrid_stem": {"type": "conv", "stride": 4, "channels": [8, 16, 16]}}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """An ImageFolder .tar.gz of 32 px JPEGs: 'red' and 'blue' images with noise, easy to learn."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", 64), ("test", 16)):
            for label, channel in (("blue", 2), ("red", 0)):
                for i in range(count):
                    pixels = rng.integers(0, 100, (32, 32, 3), dtype=np.uint8)
                    pixels[..., channel] += 150
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                    info = tarfile.TarInfo(f"{split}/{label}/{i:04d}.jpg")
                    info.size = len(buffer.getvalue())
                    tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return path


def test_benchmark_learns_and_reports_each_epoch(archive):
    recipe = Recipe(model="vit_cifar_conv", epochs=3, batch_size=32, lr=3e-3, warmup_epochs=0.5,
                    compile=False, overrides=TINY)
    result = run_cifar10(recipe=recipe, data=archive, device="cpu", workers=1, log=lambda line: None)
    history = result["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    times = [row["train_s"] for row in history]
    assert all(b > a for a, b in zip(times, times[1:]))
    # Two colours are trivially separable: well above the 50% of chance after 3 epochs.
    assert result["final_acc"] >= 0.9
    assert result["time_to"]["0.9"] is not None and result["time_to"]["0.9"] <= result["train_s"]


def test_benchmark_trains_with_randaugment_and_mixup(archive, monkeypatch):
    import vitkit.time_to_accuracy as engine

    mixed = []
    real = engine.mix_batch
    monkeypatch.setattr(engine, "mix_batch", lambda *a, **k: mixed.append(k["step"]) or real(*a, **k))
    recipe = Recipe(model="vit_cifar_conv", epochs=4, batch_size=32, lr=3e-3, warmup_epochs=0.5, compile=False,
                    augment="randaugment", mixup=0.8, cutmix=1.0, overrides=TINY)
    result = run_cifar10(recipe=recipe, data=archive, device="cpu", workers=1, log=lambda line: None)
    assert result["recipe"]["augment"] == "randaugment" and result["recipe"]["mixup"] == 0.8
    assert mixed[-4 * 4:] == list(range(4 * 4))  # every training step mixed, keyed by its index
    assert result["final_acc"] >= 0.8  # still learns the two colours through the stronger augmentation


@pytest.mark.parametrize("flag, value, message", [("--mixup", "-1", "--mixup must lie in [0, inf) (got -1.0)"),
                                                  ("--lr", "0", "--lr must be positive (got 0.0)"),
                                                  ("--label-smoothing", "1", "--label-smoothing must lie in [0, 1) (got 1.0)")])
def test_bad_recipe_values_are_one_line_errors(archive, capsys, flag, value, message):
    assert main(["bench", "cifar10", "--data", str(archive), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_time_budget_sets_epochs_from_the_first_epoch(archive):
    recipe = Recipe(model="vit_cifar_conv", time_budget=3.0, batch_size=32, compile=False, tta="none", overrides=TINY)
    result = run_cifar10(recipe=recipe, data=archive, device="cpu", workers=1, log=lambda line: None)
    first = result["history"][0]["train_s"]
    assert len(result["history"]) == result["epochs"]
    # The number of epochs is the budget over the measured first epoch (train_s is rounded to 10 ms).
    assert max(1, int(3.0 / ((first + 0.005) * 1.02))) <= result["epochs"] <= max(1, int(3.0 / (max(first - 0.005, 1e-3) * 1.02)))


def test_cli_writes_json_and_rejects_bad_input(archive, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    code = main(["bench", "cifar10", "--data", str(archive), "--epochs", "1", "--batch-size", "32", "--no-compile",
                 "--device", "cpu", "--workers", "1", "--tta", "none", "--json", str(out),
                 *[arg for key, value in TINY.items() for arg in ("--set", f"{key}={json.dumps(value)}")]])
    assert code == 0
    row = json.loads(out.read_text())
    assert row["recipe"]["overrides"]["depth"] == 1 and len(row["history"]) == 1
    assert "epoch   1" in capsys.readouterr().out
    assert main(["bench", "cifar10", "--data", str(tmp_path / "missing.tar.gz")]) == 2
    assert "CIFAR-10 archive not found" in capsys.readouterr().err


def test_the_archive_is_found_from_any_directory(tmp_path, monkeypatch):
    # benchmarks/cifar10.py is often run from benchmarks/ or elsewhere; the checkout's copy still counts.
    from vitkit.time_to_accuracy import DEFAULT_ARCHIVES, _CHECKOUT, find_archive

    if not any((_CHECKOUT / a).is_file() for a in DEFAULT_ARCHIVES):
        pytest.skip("no CIFAR-10 archive beside this checkout")
    monkeypatch.chdir(tmp_path)
    assert find_archive(None).is_file()


def test_library_engine_refuses_a_time_budget_and_unreached_goals_read_plainly(archive, monkeypatch):
    from vitkit.errors import VitkitError

    with pytest.raises(VitkitError, match="--time-budget"):
        run_cifar10(recipe=Recipe(model="vit_cifar", time_budget=5.0), data=archive, engine="library", device="cpu")
    # An epoch that stays at chance: the goals were never reached, and the line says so.
    import vitkit.time_to_accuracy as tta

    history = [{"epoch": 1, "train_s": 1.0, "test_acc": 0.5, "train_loss": 0.7}]
    monkeypatch.setattr(tta, "train_to_accuracy", lambda **kw: {"epochs": 1, **tta._summary(history)})
    lines = []
    run_cifar10(recipe=Recipe(model="vit_cifar", epochs=1, batch_size=64), data=archive, device="cpu",
                log=lines.append)
    assert "time to 90%: not reached" in lines[-1] and "None" not in lines[-1]


def test_translate_tta_averages_mirrored_and_shifted_views():
    import torch

    from vitkit.time_to_accuracy import _shift, _tta_logits

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    torch.testing.assert_close(_shift(x, 1)[..., 1:, 1:], x[..., :-1, :-1])  # down and right
    torch.testing.assert_close(_shift(x, -1)[..., :-1, :-1], x[..., 1:, 1:])
    torch.testing.assert_close(_shift(x, 1)[..., 0, 1:], x[..., 1, :-1])  # the edge reflected
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    model(x)
    views = [x, x.flip(3)]
    expected = sum(model(v) for v in views) + 0.5 * sum(model(_shift(v, s)) for v in views for s in (-1, 1))
    torch.testing.assert_close(_tta_logits(model, x, "translate"), expected)
    torch.testing.assert_close(_tta_logits(model, x, "flip"), model(x) + model(x.flip(3)))
    torch.testing.assert_close(_tta_logits(model, x, "none"), model(x))


def test_unknown_tta_is_refused_before_any_work(archive):
    from vitkit.errors import VitkitError

    with pytest.raises(VitkitError, match="--tta 'mirror'"):
        run_cifar10(recipe=Recipe(tta="mirror", compile=False, overrides=TINY), data=archive, device="cpu")


def test_tta_given_as_before_the_views_had_names_still_means_what_it_did():
    from vitkit.cli import build_parser

    assert (Recipe(tta=True).tta, Recipe(tta=False).tta) == ("flip", "none")
    assert build_parser().parse_args(["bench", "cifar10", "--no-tta"]).tta == "none"
