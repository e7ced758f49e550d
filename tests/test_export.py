"""Export round-trips: each format takes two batch sizes and two resolutions and gives PyTorch's logits."""

import numpy as np
import pytest
import torch

from conftest import randomize
from vitkit.cli import main
from vitkit.config import ViTConfig
from vitkit.errors import VitkitError
from vitkit.export import export_model
from vitkit.model import VisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=10)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(VisionTransformer(ViTConfig(**TINY))).eval()


@pytest.mark.parametrize("fmt,ext", [("onnx", "onnx"), ("torchscript", "pt"), ("exported-program", "pt2")])
def test_export_round_trips_at_two_resolutions(model, tmp_path, fmt, ext):
    report = export_model(model, format=fmt, out=tmp_path / f"m.{ext}")
    assert report.path.exists()
    # The example size and a larger, non-square grid (which resamples the position embeddings).
    assert list(report.checks) == ["2x32x32", "3x48x40"]
    assert all(error < 1e-5 for error in report.checks.values()), report.checks


def test_onnx_runs_a_third_resolution_in_onnxruntime(model, tmp_path):
    import onnxruntime

    export_model(model, format="onnx", out=tmp_path / "m.onnx", img_size=24)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 56, 16)  # neither the example's batch nor its grid, and far from square
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == (5, 10)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_export_does_not_pin_the_model_to_its_training_grid(model):
    """The position embeddings must resample inside the graph; a broken export would still match
    at the example size, so check that resolution changes the logits as PyTorch says."""
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={
        "x": {0: torch.export.Dim("b", min=1, max=64), 2: 8 * torch.export.Dim("h", min=1, max=16),
              3: 8 * torch.export.Dim("w", min=1, max=16)}})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


def test_bad_export_arguments_are_one_line_errors(model, tmp_path, capsys):
    with pytest.raises(VitkitError, match="--img-size 30"):
        export_model(model, format="onnx", out=tmp_path / "m.onnx", img_size=30)
    with pytest.raises(VitkitError, match="does not exist"):
        export_model(model, format="torchscript", out=tmp_path / "nope" / "m.pt")
    with pytest.raises(VitkitError, match="--format"):
        export_model(model, format="tflite", out=tmp_path / "m.tflite")
    assert main(["export", "no-such-model", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "error" in capsys.readouterr().err


def test_export_cli_writes_a_checked_file(tmp_path, capsys, monkeypatch):
    import vitkit.cli as cli

    tiny = VisionTransformer(ViTConfig(**TINY))
    monkeypatch.setattr(cli, "load_or_create", lambda source, model=None: tiny)
    out = tmp_path / "m.pt2"
    assert main(["export", "tiny", "--format", "exported-program", "--out", str(out)]) == 0
    assert out.exists()
    assert "rel. error" in capsys.readouterr().out


def test_report_says_when_zero_logits_made_the_check_vacuous(tmp_path):
    fresh = VisionTransformer(ViTConfig(**TINY))  # the head starts at zero, as in the paper's code
    assert "compared zeros" in str(export_model(fresh, format="torchscript", out=tmp_path / "m.pt"))
    trained = randomize(VisionTransformer(ViTConfig(**TINY)))
    assert "compared zeros" not in str(export_model(trained, format="torchscript", out=tmp_path / "n.pt"))


@pytest.mark.parametrize("fmt,ext", [("onnx", "onnx"), ("torchscript", "pt"), ("exported-program", "pt2")])
def test_every_export_says_how_to_feed_it(tmp_path, fmt, ext):
    """A consumer of the file alone finds the normalisation, input size and class names."""
    import json

    from vitkit.config import Preprocessing

    named = randomize(VisionTransformer(ViTConfig(**{**TINY, "num_classes": 2}))).eval()
    named.class_names = ["cat", "dog"]
    named.preprocessing = Preprocessing.for_size((32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    path = export_model(named, format=fmt, out=tmp_path / f"m.{ext}").path
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        text = session.get_modelmeta().custom_metadata_map["config.json"]
    else:
        files = {"config.json": ""}
        if fmt == "torchscript":
            torch.jit.load(str(path), _extra_files=files)
        else:
            torch.export.load(str(path), extra_files=files)
        text = files["config.json"]
    meta = json.loads(text)
    assert meta["class_names"] == ["cat", "dog"]
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and meta["preprocessing"]["crop"] == [32, 32]
    assert meta["model"]["patch_size"] == [8, 8]


# ---------------------------------------------------------------------------- one file, self-contained
def test_onnx_is_one_self_contained_file(model, tmp_path):
    """The weights live inside the .onnx: copied alone to another folder, it still runs."""
    import shutil

    import onnxruntime

    (tmp_path / "out").mkdir()
    report = export_model(model, format="onnx", out=tmp_path / "out" / "m.onnx")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx"]
    assert report.data_path is None and report.files == [tmp_path / "out" / "m.onnx"]
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(tmp_path / "out" / "m.onnx", tmp_path / "elsewhere" / "copy.onnx")
    session = onnxruntime.InferenceSession(str(copy), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 40, 24)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_onnx_too_large_for_one_file_names_both_files(model, tmp_path, monkeypatch):
    # Past protobuf's limit the exporter must put the weights beside the .onnx: pretend every
    # model is that large, and the report has to name the second file.
    from torch.onnx._internal.exporter import _onnx_program

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    report = export_model(model, format="onnx", out=tmp_path / "m.onnx")
    assert report.data_path == tmp_path / "m.onnx.data" and report.data_path.stat().st_size > 0
    assert report.files == [tmp_path / "m.onnx", tmp_path / "m.onnx.data"]
    assert "m.onnx.data" in str(report) and "keep the two files together" in str(report)
    # Checked under a temporary name, then moved: the moved .onnx must find its moved weights.
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_leftover_data_file_is_not_reported_as_the_weights(model, tmp_path):
    (tmp_path / "m.onnx.data").write_bytes(b"from an earlier export")
    report = export_model(model, format="onnx", out=tmp_path / "m.onnx")
    assert report.data_path is None and ".data" not in str(report)


# ---------------------------------------------------------------------------- bad --out, bad models, grid limits
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
def test_out_that_is_a_folder_is_refused(model, tmp_path, fmt):
    with pytest.raises(VitkitError, match=r"^--out .*: is a folder"):
        export_model(model, format=fmt, out=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_folder_is_one_line_in_the_cli(tmp_path, capsys, monkeypatch):
    import vitkit.cli as cli

    monkeypatch.setattr(cli, "load_or_create", lambda source, model=None: VisionTransformer(ViTConfig(**TINY)))
    assert main(["export", "tiny", "--format", "torchscript", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "is a folder" in err and "\n" not in err and "Traceback" not in err


def test_area_interpolation_is_refused_for_onnx_and_exports_elsewhere(tmp_path):
    area = randomize(VisionTransformer(ViTConfig(**TINY, pos_embed_interpolation="area"))).eval()
    with pytest.raises(VitkitError, match="'area' interpolation.*cannot be exported to ONNX.*bicubic or bilinear"):
        export_model(area, format="onnx", out=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    # The other formats resample with the same operation as PyTorch, at every grid.
    report = export_model(area, format="exported-program", out=tmp_path / "m.pt2")
    assert not report.zero_logits and all(e < 1e-5 for e in report.checks.values())


def test_exported_graphs_take_two_patches_per_side_at_least(model, tmp_path):
    with pytest.raises(VitkitError, match=r"--img-size 8: exported graphs take 2 to 128 patches per side: 16 to 1024 px at stride 8"):
        export_model(model, format="exported-program", out=tmp_path / "m.pt2", img_size=8)
    with pytest.raises(VitkitError, match=r"--img-size 1032: exported graphs take 2 to 128"):
        export_model(model, format="onnx", out=tmp_path / "m.onnx", img_size=1032)
    one_patch = VisionTransformer(ViTConfig(**{**TINY, "img_size": 8}))
    with pytest.raises(VitkitError, match=r"the model's image size 8x8 \(set --img-size\)"):
        export_model(one_patch, format="torchscript", out=tmp_path / "m.pt")
    # The documented minimum: a 2x2 grid runs and matches PyTorch; a 1-patch side is refused by
    # the program's own input check, which names the minimum size.
    export_model(model, format="exported-program", out=tmp_path / "m.pt2")
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x))
        with pytest.raises(Exception, match=">= 16"):
            program(torch.randn(1, 3, 8, 16))


# ---------------------------------------------------------------------------- hybrids
def _randomize_hybrid(model):
    """Random weights; norm scales near 1 so the CNN's signal reaches the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(1 + 0.2 * torch.randn_like(p) if is_norm_scale else 0.1 * torch.randn_like(p))
    return model.eval()


class _Deadline:
    """Fail instead of hanging: the hybrid export once spent minutes in sympy."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def expired(signum, frame):
            raise TimeoutError(f"export took over {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


RESNET_TINY = dict(img_size=32, patch_size=1, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=5,
                   hybrid_stem={"type": "resnet", "layers": [1, 1], "stride": 8, "width": 32})
CONV_TINY = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                 hybrid_stem={"type": "conv", "stride": 4, "channels": [8, 16, 16], "strides": [1, 2, 2]})


@pytest.mark.parametrize("fmt,ext", [("exported-program", "pt2"), ("onnx", "onnx")])
def test_resnet_hybrid_exports_with_dynamic_sizes(tmp_path, fmt, ext):
    from vitkit import create_model

    hybrid = _randomize_hybrid(create_model(ViTConfig(**RESNET_TINY)))
    with _Deadline(90):
        report = export_model(hybrid, format=fmt, out=tmp_path / f"m.{ext}")
    assert list(report.checks) == ["2x32x32", "3x48x40"] and not report.zero_logits
    assert all(e < 1e-4 for e in report.checks.values()), report.checks
    # A third size, straight from the file: 40x24 pads the ResNet's convs asymmetrically (TF SAME).
    x = torch.randn(1, 3, 40, 24)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    else:
        got = torch.export.load(str(report.path)).module()(x)
    with torch.no_grad():
        torch.testing.assert_close(got, hybrid(x), atol=1e-4, rtol=1e-4)


def test_conv_stem_hybrid_exports_with_dynamic_sizes(tmp_path):
    from vitkit import create_model

    hybrid = _randomize_hybrid(create_model("vit_cifar_conv", **CONV_TINY))
    with _Deadline(90):
        report = export_model(hybrid, format="exported-program", out=tmp_path / "m.pt2")
    assert list(report.checks) == ["2x32x32", "3x40x36"] and not report.zero_logits
    assert all(e < 1e-4 for e in report.checks.values()), report.checks
    x = torch.randn(2, 3, 24, 48)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(report.path)).module()(x), hybrid(x), atol=1e-4, rtol=1e-4)


def test_a_failed_export_leaves_the_file_there_untouched_and_bad_paths_are_one_line(model, tmp_path):
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"the user's earlier export")
    with pytest.raises(VitkitError, match="differ from PyTorch's.*nothing written"):
        export_model(model, format="torchscript", out=out, tolerance=-1.0)  # no export can pass
    assert out.read_bytes() == b"the user's earlier export"
    assert [f.name for f in tmp_path.iterdir()] == ["keep.onnx"]  # no partial file left behind
    export_model(model, format="torchscript", out=out)
    assert out.read_bytes() != b"the user's earlier export"
    with pytest.raises(VitkitError, match="name it m.ep.pt2"):
        export_model(model, format="exported-program", out=tmp_path / "m.ep")
    with pytest.raises(VitkitError, match="--out /proc/m.pt: cannot be written"):
        export_model(model, format="torchscript", out="/proc/m.pt")


def test_size_errors_name_both_strides_of_non_square_patches(tmp_path):
    wide = VisionTransformer(ViTConfig(**{**TINY, "img_size": (64, 32), "patch_size": (8, 16)}))
    with pytest.raises(VitkitError, match=r"divisible by the model's stride 8x16 \(height x width\)"):
        export_model(wide, format="torchscript", out=tmp_path / "m.pt", img_size=24)
    with pytest.raises(VitkitError, match="16 to 1024 px and 32 to 2048 px at stride 8x16"):
        export_model(wide, format="torchscript", out=tmp_path / "m.pt", img_size=16)


def test_an_exporter_failure_is_not_called_a_write_failure(model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op aten::frobnicate")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with pytest.raises(VitkitError, match=r"m.pt: export failed \(unsupported op aten::frobnicate\)"):
        export_model(model, format="torchscript", out=tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []
