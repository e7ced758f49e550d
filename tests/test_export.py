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
    monkeypatch.setattr(cli, "_model_from", lambda source, model_name=None: tiny)
    out = tmp_path / "m.pt2"
    assert main(["export", "tiny", "--format", "exported-program", "--out", str(out)]) == 0
    assert out.exists()
    assert "rel. error" in capsys.readouterr().out


def test_report_says_when_zero_logits_made_the_check_vacuous(tmp_path):
    fresh = VisionTransformer(ViTConfig(**TINY))  # the head starts at zero, as in the paper's code
    assert "compared zeros" in str(export_model(fresh, format="torchscript", out=tmp_path / "m.pt"))
    trained = randomize(VisionTransformer(ViTConfig(**TINY)))
    assert "compared zeros" not in str(export_model(trained, format="torchscript", out=tmp_path / "n.pt"))
