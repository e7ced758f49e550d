"""Broken image files through the train and eval commands: skipped with one warning, counted,
and the exit status says so; --strict stops at the first one with a one-line error."""

import io

import pytest
from PIL import Image

from test_train import make_shapes
from vitkit.cli import EXIT_PARTIAL, EXIT_USAGE, main

TINY = ["--model", "vit_cifar", "--patch-size", "4", "--img-size", "16", "--epochs", "1", "--batch-size", "16",
        "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = make_shapes(tmp_path_factory.mktemp("messy"), per_class=8, val_per_class=4)
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(jpeg, "JPEG")
    (root / "train" / "disc" / "empty.png").write_bytes(b"")
    (root / "train" / "bar" / "random.jpg").write_bytes(bytes(range(256)) * 3)
    (root / "val" / "square" / "truncated.jpg").write_bytes(jpeg.getvalue()[:50])
    (root / "val" / "bar" / "notes.png").write_text("not an image")
    return root


def test_train_skips_broken_images_and_exits_partial(messy, tmp_path, capsys):
    with pytest.warns(UserWarning, match="skipped 4 unreadable"):
        code = main(["train", "--data", str(messy), "--out", str(tmp_path / "run"), *TINY])
    assert code == EXIT_PARTIAL
    assert "4 unreadable image(s) were skipped" in capsys.readouterr().err
    assert (tmp_path / "run" / "best" / "config.json").is_file()  # the run itself completed


def test_eval_skips_broken_images_and_exits_partial(messy, tmp_path, capsys):
    with pytest.warns(UserWarning, match="skipped"):
        main(["train", "--data", str(messy), "--out", str(tmp_path / "run"), *TINY])
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        code = main(["eval", str(tmp_path / "run"), "--data", str(messy)])
    assert code == EXIT_PARTIAL
    assert "on 12 images (2 unreadable, skipped)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "eval"])
def test_strict_stops_with_one_line_naming_the_file(messy, tmp_path, capsys, command):
    if command == "train":
        args = ["train", "--data", str(messy), "--out", str(tmp_path / "run"), "--strict", *TINY]
    else:
        with pytest.warns(UserWarning):
            main(["train", "--data", str(messy), "--out", str(tmp_path / "run"), *TINY])
        capsys.readouterr()
        args = ["eval", str(tmp_path / "run"), "--data", str(messy), "--strict"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and any(name in err[0] for name in ("empty.png", "random.jpg", "truncated.jpg", "notes.png"))


def test_the_skip_warning_is_one_line_for_a_user(messy, tmp_path):
    # Outside pytest's warning capture, as on a terminal: no file:line of vitkit's source.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vitkit", "train", "--data", str(messy), "--out",
                           str(tmp_path / "run"), *TINY], capture_output=True, text=True, timeout=300)
    warning = [line for line in done.stderr.splitlines() if ": warning:" in line]
    assert done.returncode == EXIT_PARTIAL and len(warning) == 1
    assert warning[0].startswith("vitkit train: warning: skipped 4 unreadable") and ".py:" not in done.stderr
