"""The streaming path (datasets over IN_MEMORY_LIMIT) against the in-memory one on the same
broken dataset: the same images skipped and reported, labels that stay with their images, and
--strict stopping at the first unreadable image."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit.data as data
from vitkit.cli import EXIT_PARTIAL, EXIT_USAGE, main
from vitkit.config import Preprocessing
from vitkit.data import StreamingLoader, TensorLoader, build_data, build_eval_loader
from vitkit.errors import VitkitError

CLASSES = ["cat", "dog", "eel"]
PRE = Preprocessing.for_size((16, 16))


def _image(label: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 60, (16, 16, 3), dtype=np.uint8)
    pixels[..., label] += 150  # the dominant channel is the class, so labels can be checked from pixels
    return Image.fromarray(pixels)


def _encoded(fmt: str, seed: int = 0) -> bytes:
    out = io.BytesIO()
    _image(0, seed).save(out, fmt)
    return out.getvalue()


@pytest.fixture
def broken(tmp_path) -> Path:
    """An ImageFolder whose broken files sit in several classes, mostly not last, so that a
    replacement by a neighbour or a shifted label would show."""
    root = tmp_path / "ds"
    for split, count in (("train", 8), ("val", 5)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                _image(label, label * 1000 + i + (500 if split == "val" else 0)).save(root / split / name / f"{i:03d}.png")
    (root / "train" / "cat" / "001a_empty.png").write_bytes(b"")
    (root / "train" / "dog" / "002a_random.jpg").write_bytes(np.random.default_rng(1).bytes(400))
    (root / "val" / "cat" / "000a_text.png").write_text("not an image")
    (root / "val" / "dog" / "003a_cut.jpg").write_bytes(_encoded("JPEG")[:60])  # cut inside the header
    (root / "val" / "dog" / "004a_cut.png").write_bytes(_encoded("PNG")[:-30])  # cut inside the pixel data
    return root


def _all(loader, epoch=0):
    xs, ys = zip(*[(x, y) for x, y in loader.iterate(epoch)])
    return torch.cat(xs), torch.cat(ys)


def _bundle(root, **kwargs):
    with pytest.warns(UserWarning, match="unreadable") as record:
        bundle = build_data(str(root), img_size=16, batch_size=4, augment="none", **kwargs)
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    return bundle


def test_streaming_train_and_val_skip_and_label_like_in_memory(broken):
    memory, stream = _bundle(broken, in_memory=True), _bundle(broken, in_memory=False)
    assert isinstance(memory.train, TensorLoader) and isinstance(stream.train, StreamingLoader)
    assert len(memory.skipped) == 5 and stream.skipped == memory.skipped  # same files, same reasons, same order
    assert any("004a_cut.png" in s for s in stream.skipped)  # truncated data, not only a bad header
    for part in ("train", "val"):
        m, s = getattr(memory, part), getattr(stream, part)
        assert (s.num_samples, len(s)) == (m.num_samples, len(m))
        (xm, ym), (xs, ys) = _all(m, epoch=1), _all(s, epoch=1)
        assert torch.equal(ym, ys)
        torch.testing.assert_close(xs, xm, atol=1e-5, rtol=0)
        assert torch.equal(xs.mean((2, 3)).argmax(1), ys)  # every label is its own image's
    assert stream.val.num_samples == 15  # 5 per class, 3 broken files left out


def test_streaming_eval_loader_matches_in_memory(broken):
    results = {}
    for in_memory in (True, False):
        with pytest.warns(UserWarning, match="skipped 3 unreadable"):
            loader, names, skipped = build_eval_loader(str(broken), preprocessing=PRE, batch_size=4,
                                                       in_memory=in_memory)
        results[in_memory] = (names, skipped, *_all(loader))
    (nm, sm, xm, ym), (ns, ss, xs, ys) = results[True], results[False]
    assert nm == ns == CLASSES and ss == sm and len(ys) == len(ym) == 15
    assert torch.equal(ys, ym) and torch.equal(xs.mean((2, 3)).argmax(1), ys)
    torch.testing.assert_close(xs, xm, atol=1e-5, rtol=0)


def test_streaming_strict_raises_the_first_unreadable_image_as_in_memory(broken):
    messages = []
    for in_memory in (True, False):
        with pytest.raises(VitkitError) as caught:
            build_data(str(broken), img_size=16, batch_size=4, strict=True, in_memory=in_memory)
        messages.append(str(caught.value))
        with pytest.raises(VitkitError, match="000a_text.png"):
            build_eval_loader(str(broken), preprocessing=PRE, batch_size=4, strict=True, in_memory=in_memory)
    assert messages[0] == messages[1] and "001a_empty.png: the file is empty" in messages[1]
    assert "\n" not in messages[1]


def test_over_the_memory_limit_streams_and_the_cli_reports_skips(broken, tmp_path, monkeypatch, capsys):
    tiny = ["--model", "vit_cifar", "--patch-size", "4", "--img-size", "16", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--no-progress"]
    with pytest.warns(UserWarning, match="skipped 5 unreadable"):
        assert main(["train", "--data", str(broken), "--out", str(tmp_path / "run"), *tiny]) == EXIT_PARTIAL
    reference = []
    for limit in (data.IN_MEMORY_LIMIT, 0):
        monkeypatch.setattr(data, "IN_MEMORY_LIMIT", limit)
        capsys.readouterr()
        with pytest.warns(UserWarning, match="skipped 3 unreadable"):
            assert main(["eval", str(tmp_path / "run"), "--data", str(broken), "--json"]) == EXIT_PARTIAL
        out = capsys.readouterr().out
        reference.append(out[out.index("{"):])
    assert reference[0] == reference[1]  # n, top-1, per-class accuracy and the skipped list
    with pytest.warns(UserWarning, match="skipped 5 unreadable"):
        assert isinstance(build_data(str(broken), img_size=16, batch_size=4).train, StreamingLoader)
    assert main(["eval", str(tmp_path / "run"), "--data", str(broken), "--strict"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "000a_text.png" in err[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_that_fails_only_when_decoded_is_dropped_with_its_label(broken, workers):
    # A JPEG cut inside its entropy-coded data has a sound header: the scan passes it, and the
    # loader must find it while iterating.
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(whole, "JPEG")
    (broken / "val" / "eel" / "002a_late.jpg").write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        loader, _, skipped = build_eval_loader(str(broken), preprocessing=PRE, batch_size=4, in_memory=False,
                                               workers=workers)
    assert not any("002a_late" in s for s in skipped) and loader.num_samples == 16
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable.*002a_late\.jpg"):
        x, y = _all(loader)
    assert len(y) == 15 and torch.equal(x.mean((2, 3)).argmax(1), y)
    assert torch.bincount(y).tolist() == [5, 5, 5]
    assert len(skipped) == 4 and "002a_late" in skipped[-1]  # reported into the list the caller holds
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second pass meets it again, silently, and does not re-count it
        assert len(_all(loader)[1]) == 15
    assert len(skipped) == 4
    for name in ("cat/000a_text.png", "dog/003a_cut.jpg", "dog/004a_cut.png"):
        (broken / "val" / name).unlink()
    strict, _, _ = build_eval_loader(str(broken), preprocessing=PRE, batch_size=4, in_memory=False, workers=workers,
                                     strict=True)
    with pytest.raises(VitkitError, match=r"002a_late\.jpg") as caught:
        _all(strict)
    assert "\n" not in str(caught.value)


def test_streaming_datasets_survive_spawned_workers(broken, tmp_path):
    # macOS and Windows start DataLoader workers by "spawn", which pickles the dataset: every source's
    # fetcher and every transform must pickle, and the unpickled copy must give the same image.
    import pickle
    import tarfile

    archive = tmp_path / "ds.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(broken, arcname="")
    loaders = []
    for source, kwargs in ((broken, dict(max_train=12)), (archive, {}), (broken, dict(unlabelled=True)),
                           (None, dict(random_erasing=0.5))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundle = build_data(None if source is None else str(source), img_size=16, batch_size=4, in_memory=False,
                                augment="none" if source is None else None, **kwargs)
        loaders += [bundle.train, bundle.val]
    for loader in loaders:
        assert isinstance(loader, StreamingLoader)
        copy = pickle.loads(pickle.dumps(loader.dataset))
        with torch.random.fork_rng(devices=[]):
            first = loader.dataset[(0, 7)][0]
        assert torch.equal(copy[(0, 7)][0], first)
