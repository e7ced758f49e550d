import io
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.config import Preprocessing
from vitkit.data import SAMPLE_FILE, build_data, build_eval_loader
from vitkit.data.decode import probe_sizes
from vitkit.data.sources import open_source
from vitkit.errors import VitkitError
from vitkit.images import preprocess, read_image

CLASSES = ["cat", "dog", "eel"]


def _image(label: int, i: int, size=(16, 16)) -> Image.Image:
    rng = np.random.default_rng(label * 100 + i)
    pixels = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., label] += 150  # each class has its own dominant channel
    return Image.fromarray(pixels)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "ds"
    for split, count in (("train", 8), ("val", 4)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                _image(label, i + (100 if split == "val" else 0)).save(root / split / name / f"{i:03d}.png")
    return root


def _batches(loader, epoch=0, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.iterate(epoch, start)]


def test_contract_shapes_lengths_and_labels(folder):
    bundle = build_data(str(folder), img_size=16, batch_size=5)
    assert bundle.class_names == CLASSES and bundle.skipped == []
    assert (bundle.train.num_samples, bundle.val.num_samples) == (24, 12)
    assert len(bundle.train) == 24 // 5 and len(bundle.val) == 3  # train drops the last partial batch; val keeps it
    batches = _batches(bundle.val)
    assert [len(y) for _, y in batches] == [5, 5, 2]
    x, y = batches[0]
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert bundle.preprocessing.crop == (16, 16)
    # Labels follow the pixels: the dominant channel is the class.
    x_all = torch.cat([b[0] for b in batches])
    y_all = torch.cat([b[1] for b in batches])
    assert torch.equal(x_all.mean((2, 3)).argmax(1), y_all)


def test_val_batches_equal_the_predict_preprocessing(folder):
    loader, names, _ = build_eval_loader(str(folder), preprocessing=Preprocessing.for_size((16, 16)), batch_size=12)
    x, y = next(loader.iterate(0))
    files = sorted((folder / "val").glob("*/*.png"))
    expected = torch.stack([preprocess(read_image(f), Preprocessing.for_size((16, 16))) for f in files])
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert y.tolist() == [CLASSES.index(f.parent.name) for f in files]


def test_resume_mid_epoch_sees_the_same_batches(folder):
    bundle = build_data(str(folder), img_size=16, batch_size=4, augment="randaugment", random_erasing=0.5, seed=3)
    full = _batches(bundle.train, epoch=2)
    tail = _batches(bundle.train, epoch=2, start=3)
    assert len(tail) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    again = build_data(str(folder), img_size=16, batch_size=4, augment="randaugment", random_erasing=0.5, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, _batches(again.train, epoch=2)))
    other_epoch = _batches(bundle.train, epoch=3)
    assert not torch.equal(full[0][1], other_epoch[0][1]) or not torch.equal(full[0][0], other_epoch[0][0])
    # An epoch is a permutation: every training image once.
    seen = torch.cat([y for _, y in full])
    assert torch.bincount(seen, minlength=3).tolist() == [8, 8, 8]


@pytest.mark.parametrize("augment", ["none", None])
def test_rank_shards_concatenate_to_the_single_process_batch(folder, augment):
    single = build_data(str(folder), img_size=16, batch_size=6, augment=augment, seed=1)
    ranks = [build_data(str(folder), img_size=16, batch_size=3, augment=augment, seed=1, rank=r, world_size=2)
             for r in range(2)]
    assert len(ranks[0].train) == len(single.train) == 4
    for (x, y), (x0, y0), (x1, y1) in zip(_batches(single.train, 1), _batches(ranks[0].train, 1),
                                          _batches(ranks[1].train, 1)):
        assert torch.equal(torch.cat([y0, y1]), y)
        assert torch.equal(torch.cat([x0, x1]), x)


def test_augmentations_change_pixels_but_keep_shape_and_range(folder):
    plain = _batches(build_data(str(folder), img_size=16, batch_size=8, augment="none").train)[0][0]
    for augment in (None, "randaugment", "trivialaugment"):
        x = _batches(build_data(str(folder), img_size=16, batch_size=8, augment=augment).train)[0][0]
        assert x.shape == plain.shape and torch.isfinite(x).all()
        assert x.min() >= -1.0 - 1e-5 and x.max() <= 1.0 + 1e-5  # mean=std=0.5 maps [0, 1] to [-1, 1]
        assert not torch.equal(x, plain)
    erased = _batches(build_data(str(folder), img_size=16, batch_size=8, augment="none", random_erasing=1.0).train)
    zeros = (erased[0][0] == 0).all(1).flatten(1).sum(1)  # erased pixels per sample
    assert (zeros >= 0.02 * 256 * 0.5).all()


def test_upsampling_and_large_images_use_random_resized_crop(folder):
    bundle = build_data(str(folder), img_size=96, batch_size=4)
    x, _ = next(bundle.train.iterate(0))
    assert x.shape == (4, 3, 96, 96)
    assert bundle.preprocessing.resize == 110  # 96 * 256/224, the usual eval resize


def test_archives_read_like_the_folder(folder, tmp_path):
    tgz, zpath = tmp_path / "ds.tar.gz", tmp_path / "ds.zip"
    with tarfile.open(tgz, "w:gz") as archive:
        archive.add(folder, arcname="top")  # a single top folder is allowed
    with zipfile.ZipFile(zpath, "w") as archive:
        for f in sorted(folder.rglob("*.png")):
            archive.write(f, f.relative_to(folder).as_posix())
    reference = _batches(build_data(str(folder), img_size=16, batch_size=12).val)
    for source in (tgz, zpath):
        bundle = build_data(str(source), img_size=16, batch_size=12)
        assert bundle.class_names == CLASSES
        for (xa, ya), (xb, yb) in zip(reference, _batches(bundle.val)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_broken_files_are_skipped_with_one_warning_or_fail_when_strict(folder):
    (folder / "train" / "cat" / "empty.png").write_bytes(b"")
    (folder / "train" / "dog" / "junk.jpg").write_bytes(b"not an image at all")
    good = io.BytesIO()
    _image(0, 0).save(good, "JPEG")
    (folder / "val" / "eel" / "cut.jpg").write_bytes(good.getvalue()[:60])
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable") as record:
        bundle = build_data(str(folder), img_size=16, batch_size=4)
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    assert len(bundle.skipped) == 3 and any("empty.png" in s for s in bundle.skipped)
    assert (bundle.train.num_samples, bundle.val.num_samples) == (24, 12)
    with pytest.raises(VitkitError, match="junk.jpg|empty.png"):
        build_data(str(folder), img_size=16, batch_size=4, strict=True)


def test_mixed_sizes_and_streaming_agree(folder):
    for i, size in enumerate([(1, 1), (40, 20), (20, 50)]):
        _image(1, 50 + i, size).save(folder / "val" / "dog" / f"odd{i}.png")
    pre = Preprocessing.for_size((16, 16))
    memory, _, _ = build_eval_loader(str(folder), preprocessing=pre, batch_size=15, in_memory=True)
    stream, _, _ = build_eval_loader(str(folder), preprocessing=pre, batch_size=15, in_memory=False)
    xm, ym = next(memory.iterate(0))
    xs, ys = next(stream.iterate(0))
    assert torch.equal(ym, ys) and xm.shape == xs.shape == (15, 3, 16, 16)
    # Two resampling paths (PIL once vs. cover-crop then tensor resize): close, not bit-equal.
    assert (xm - xs).abs().mean() < 0.05
    train = build_data(str(folder), img_size=16, batch_size=4, in_memory=False, augment="randaugment").train
    first, again = _batches(train, 0), _batches(train, 0, start=2)
    assert first[0][0].shape == (4, 3, 16, 16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], again))


def test_one_odd_size_beyond_the_probed_images_is_cover_cropped(tmp_path):
    # 40 images a class, the outlier sorted last: the 16 probed headers all say 16x16.
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(40):
                _image(label, i + (100 if split == "val" else 0)).save(root / split / name / f"{i:03d}.png")
        Image.new("RGB", (20, 24), (30, 60, 220)).save(root / split / "eel" / "zzz_odd.png")
    val_split, _ = open_source(str(root), "val")
    assert val_split.names[-1].endswith("zzz_odd.png") and set(probe_sizes(val_split)) == {(16, 16)}
    bundle = build_data(str(root), img_size=16, batch_size=16)
    assert (bundle.train.num_samples, bundle.val.num_samples) == (121, 121) and bundle.skipped == []
    assert tuple(bundle.train.pixels.shape) == (121, 16, 16, 3)
    pre = Preprocessing.for_size((16, 16))
    loader, _, _ = build_eval_loader(str(root), preprocessing=pre, batch_size=121)
    x, y = next(loader.iterate(0))
    files = sorted((root / "val").glob("*/*.png"), key=lambda f: (f.parent.name, f.name))
    expected = torch.stack([preprocess(read_image(f), pre) for f in files])
    # The 16x16 images are untouched; the odd one is resized and cropped to 16x16, its colour kept.
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert torch.equal(x.mean((2, 3)).argmax(1), y)


def test_eval_on_a_val_only_folder_or_archive_takes_the_class_names_from_val(folder, tmp_path):
    only = tmp_path / "only"
    only.mkdir()
    (folder / "val").rename(only / "val")
    pre = Preprocessing.for_size((16, 16))
    zpath = tmp_path / "only.zip"
    with zipfile.ZipFile(zpath, "w") as archive:
        for f in sorted(only.rglob("*.png")):
            archive.write(f, "top/" + f.relative_to(only).as_posix())
    for source in (only, zpath):
        loader, names, skipped = build_eval_loader(str(source), preprocessing=pre, batch_size=12)
        x, y = next(loader.iterate(0))
        assert names == CLASSES and skipped == [] and torch.bincount(y).tolist() == [4, 4, 4]
        assert torch.equal(x.mean((2, 3)).argmax(1), y)
        with pytest.raises(VitkitError, match="no train/<class>/<image>|needs train/ and val/"):
            build_data(str(source), img_size=16, batch_size=4)  # training still needs train/
    # A model's class names: a val split holding some of the classes keeps the model's indices.
    shutil.rmtree(only / "val" / "dog")
    loader, names, _ = build_eval_loader(str(only), preprocessing=pre, batch_size=12, class_names=CLASSES)
    _, y = next(loader.iterate(0))
    assert names == CLASSES and y.tolist() == [0] * 4 + [2] * 4
    with pytest.raises(VitkitError, match="classes the model lacks: \\['eel'\\]"):
        build_eval_loader(str(only), preprocessing=pre, batch_size=12, class_names=["cat", "dog"])
    (tmp_path / "none" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(VitkitError, match=r"needs val/ \(or test/\) subfolders; found \['train'\]"):
        build_eval_loader(str(tmp_path / "none"), preprocessing=pre, batch_size=4)


def test_embedded_sample_is_small_balanced_and_readable():
    assert SAMPLE_FILE.stat().st_size <= 8 * 1024**2
    bundle = build_data(None, img_size=32, batch_size=100, max_train=1000)
    assert bundle.class_names[:3] == ["airplane", "automobile", "bird"] and len(bundle.class_names) == 10
    assert bundle.val.num_samples == 1000 and bundle.train.num_samples == 1000 and bundle.skipped == []
    assert torch.bincount(bundle.val.labels).tolist() == [100] * 10
    x, _ = next(bundle.val.iterate(0))
    assert x.shape == (100, 3, 32, 32) and x.std() > 0.2  # real photographs, not blank images


def _write_cifar(root: Path, payload=None) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = payload if payload is not None and name == "test_batch" else {
            "data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [i, 1, 2, 3]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_official_files_and_refusing_code_in_them(tmp_path):
    _write_cifar(tmp_path / "ok")
    bundle = build_data(f"cifar10:{tmp_path / 'ok'}", img_size=32, batch_size=4, augment="none")
    assert bundle.class_names[0] == "c0" and bundle.train.num_samples == 20 and bundle.val.num_samples == 4
    _write_cifar(tmp_path / "evil", payload={"data": print, "labels": []})  # a pickled callable
    with pytest.raises(VitkitError, match="refused global"):
        build_data(f"cifar10:{tmp_path / 'evil'}", img_size=32, batch_size=4)
    with pytest.raises(VitkitError, match="official python version"):
        build_data(f"cifar10:{tmp_path}", img_size=32, batch_size=4)


def test_bad_sources_and_arguments_name_the_problem(folder, tmp_path):
    with pytest.raises(VitkitError, match="no such dataset"):
        build_data(str(tmp_path / "missing"), img_size=16, batch_size=4)
    (tmp_path / "flat").mkdir()
    with pytest.raises(VitkitError, match="train/ and val/"):
        build_data(str(tmp_path / "flat"), img_size=16, batch_size=4)
    (tmp_path / "bad.zip").write_bytes(b"PK nope")
    with pytest.raises(VitkitError, match="not a readable archive"):
        build_data(str(tmp_path / "bad.zip"), img_size=16, batch_size=4)
    with pytest.raises(VitkitError, match="--augment"):
        build_data(str(folder), img_size=16, batch_size=4, augment="autoaugment")
    with pytest.raises(VitkitError, match="fewer than one global batch"):
        build_data(str(folder), img_size=16, batch_size=20, world_size=2)
    (folder / "val" / "fox").mkdir()
    _image(0, 0).save(folder / "val" / "fox" / "a.png")
    with pytest.raises(VitkitError, match="fox"):
        build_data(str(folder), img_size=16, batch_size=4)


def test_eval_follows_an_exact_resize_on_images_of_mixed_sizes(tmp_path):
    # HF's processors resize straight to the input size: the eval loader must give preprocess()'s pixels.
    from PIL import Image

    from vitkit.config import Preprocessing
    from vitkit.data import build_eval_loader
    from vitkit.images import preprocess, read_image

    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(64, 32), (40, 48)]):
        path = tmp_path / "val" / "a" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    pre = Preprocessing(resize=32, crop=(32, 32), interpolation="bilinear", resize_mode="exact")
    loader, _, _ = build_eval_loader(str(tmp_path), preprocessing=pre, batch_size=2)
    images = torch.cat([x for x, _ in loader.iterate(0)])
    expected = torch.stack([preprocess(read_image(p), pre) for p in paths])
    torch.testing.assert_close(images, expected, atol=0.02, rtol=0)


# ---------------------------------------------------------------------------- folders as users leave them
def test_hidden_folders_and_other_files_are_not_data(folder, tmp_path):
    for split in ("train", "val"):
        (folder / split / ".ipynb_checkpoints").mkdir()
        _image(0, 0).save(folder / split / ".ipynb_checkpoints" / "x.png")
        (folder / split / "cat" / "README.txt").write_text("where these came from")
        (folder / split / "cat" / ".hidden").mkdir()
        _image(0, 1).save(folder / split / "cat" / ".hidden" / "y.png")
    zpath = tmp_path / "ds.zip"
    with zipfile.ZipFile(zpath, "w") as archive:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                archive.write(f, f.relative_to(folder).as_posix())
                archive.writestr("__MACOSX/" + f.relative_to(folder).parent.as_posix() + "/._" + f.name, b"\0\5\26\7")
    _image(1, 5).save(folder / "train" / "dog" / "extra.jfif", format="JPEG")  # a suffix Pillow knows
    for source in (folder, zpath):
        bundle = build_data(str(source), img_size=16, batch_size=4)
        assert bundle.class_names == CLASSES and bundle.skipped == []
        assert (bundle.train.num_samples, bundle.val.num_samples) == (25 if source == folder else 24, 12)
    # An empty class folder stays a class, as it always was (a run trained so keeps its head).
    (folder / "train" / "zebra").mkdir()
    assert build_data(str(folder), img_size=16, batch_size=4).class_names == [*CLASSES, "zebra"]


def test_a_folder_named_like_a_builtin_dataset_is_the_folder(folder, monkeypatch):
    shutil.copytree(folder, folder.parent / "cifar10")
    monkeypatch.chdir(folder.parent)
    bundle = build_data("cifar10", img_size=16, batch_size=4)  # never a download
    assert bundle.class_names == CLASSES
    (folder.parent / "cifar100" / "cifar-100-python").mkdir(parents=True)  # torchvision's root: not a data set
    import vitkit.data.sources as sources

    monkeypatch.setattr(sources, "_open_cifar", lambda kind, root, split: ("the built-in reader", kind))
    assert sources.open_source("cifar100", "train") == ("the built-in reader", "cifar100")


def test_large_photos_are_cut_to_the_storage_size_as_they_are_decoded(tmp_path, monkeypatch):
    import vitkit.data.decode as decoding

    root = tmp_path / "photos"
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES[:2]):
            (root / split / name).mkdir(parents=True)
            for i, size in enumerate([(300, 200), (200, 260), (320, 240)]):
                _image(label, i, size=size).save(root / split / name / f"{i}.jpg")
    import weakref

    alive, most = [], []
    decode = decoding.decode_image

    def decode_and_count(raw, *, name):
        image = decode(raw, name=name)
        alive.append(weakref.ref(image))
        most.append(sum(r() is not None for r in alive))  # full-size decoded photos held at this moment
        return image

    monkeypatch.setattr(decoding, "decode_image", decode_and_count)
    bundle = build_data(str(root), img_size=32, batch_size=2, workers=1)
    assert tuple(bundle.train.pixels.shape[1:3]) == (32, 32)
    assert bundle.train.num_samples == 6 and bundle.val.num_samples == 6
    assert len(most) == 12 and max(most) <= 2  # not all six of a split at once


def test_damaged_archives_and_links_in_them(folder, tmp_path):
    tar_path = tmp_path / "ds.tar"
    with tarfile.open(tar_path, "w") as archive:
        archive.add(folder, arcname="")
        for name, kind in (("hard.png", tarfile.LNKTYPE), ("soft.png", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(f"train/cat/{name}")
            info.type, info.linkname = kind, ("train/cat/000.png" if kind == tarfile.LNKTYPE else "000.png")
            archive.addfile(info)
        for name, target in (("loop-a.png", "loop-b.png"), ("loop-b.png", "loop-a.png")):  # skipped
            info = tarfile.TarInfo(f"train/dog/{name}")
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    bundle = build_data(str(tar_path), img_size=16, batch_size=4)
    assert bundle.train.num_samples == 26  # the two links read as their target
    raw = bytearray(tar_path.read_bytes())
    offsets = [m.offset for m in tarfile.open(tar_path)]
    raw[offsets[-5] + 148:offsets[-5] + 156] = b"99999999"  # a member header's checksum
    (tmp_path / "damaged.tar").write_bytes(bytes(raw))
    with pytest.raises(VitkitError, match="damaged.tar: not a readable archive.*damaged member header"):
        build_data(str(tmp_path / "damaged.tar"), img_size=16, batch_size=4)
    zpath = tmp_path / "ds.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for f in sorted(folder.rglob("*.png")):
            archive.write(f, f.relative_to(folder).as_posix())
    raw = bytearray(zpath.read_bytes())
    with zipfile.ZipFile(zpath) as archive:
        info = archive.infolist()[0]
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start:start + 8] = b"\xff" * 8  # the deflate stream of the first member
    (tmp_path / "bad-deflate.zip").write_bytes(bytes(raw))
    with pytest.raises(VitkitError, match="bad-deflate.zip: not a readable archive"):
        build_data(str(tmp_path / "bad-deflate.zip"), img_size=16, batch_size=4)
    (tmp_path / "zero.tar.gz").write_bytes(b"")
    with pytest.raises(VitkitError) as error:
        build_data(str(tmp_path / "zero.tar.gz"), img_size=16, batch_size=4)
    assert "\n" not in str(error.value)


def test_tiny_images_train_and_bad_arguments_are_one_line_errors(tmp_path, folder):
    root = tmp_path / "tiny"
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                _image(label, i, size=(3, 3)).save(root / split / name / f"{i}.png")
    bundle = build_data(str(root), img_size=3, batch_size=4)
    x, _ = next(bundle.train.iterate(0))
    assert x.shape == (4, 3, 3, 3)
    with pytest.raises(VitkitError, match="--data '': an empty path"):
        build_data("", img_size=16, batch_size=4)
    with pytest.raises(VitkitError, match="--workers -1"):
        build_eval_loader(str(folder), preprocessing=Preprocessing.for_size((16, 16)), batch_size=4, workers=-1)
