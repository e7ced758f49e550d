"""Export a ViT for serving: ONNX, TorchScript or a `torch.export` program, each taking any
batch size and any image size divisible by the patch size. The position embeddings resample
inside the graph (`resample_pos_embed` always runs when exporting), so one file serves every
resolution. Every export is loaded back and checked against PyTorch's logits at two resolutions
(onnxruntime for ONNX) before it is reported done.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import VitkitError

FORMATS = ("onnx", "torchscript", "exported-program")
MAX_GRID = 128  # the largest patch grid side an exported graph accepts (2048 px at P=16)


@dataclass
class ExportReport:
    """What was written, and how far the exported model's logits are from PyTorch's."""

    path: Path
    format: str
    checks: dict[str, float] = field(default_factory=dict)  # "BxHxW" -> relative L2 error
    zero_logits: bool = False  # a zero-initialised head: the logits check could not fail

    def __str__(self) -> str:
        checks = ", ".join(f"{k}: rel. error {v:.1e}" for k, v in self.checks.items())
        note = ("; note: the model's logits are all zero (an untrained, zero-initialised head), so the "
                "check compared zeros" if self.zero_logits else "")
        return f"wrote {self.path} ({self.format}); checked against PyTorch at {checks}{note}"


def _example_sizes(model: nn.Module, img_size: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """The tracing example's (H, W) and a second, different grid to check the export at."""
    config = model.config
    stride = config.stem_stride
    H, W = (img_size, img_size) if img_size is not None else config.img_size
    if H % stride[0] or W % stride[1]:
        raise VitkitError(f"--img-size {H}: must be divisible by the model's stride {stride[0]}")
    return (H, W), (H + 2 * stride[0], W + stride[1])


def _relative_error(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def export_model(model: nn.Module, *, format: str, out: str | Path, img_size: int | None = None,
                 tolerance: float = 1e-4) -> ExportReport:
    """Write `model` (a vitkit VisionTransformer, in float32) to `out` as `format` (see FORMATS)
    with a dynamic batch and image size, load the file back, and check its logits against the
    model's at the example size (`img_size`, default the model's) and at a larger, non-square one.
    Raises VitkitError if the relative L2 error exceeds `tolerance` at either."""
    if format not in FORMATS:
        raise VitkitError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if not hasattr(model, "config"):
        raise VitkitError(f"export needs a vitkit VisionTransformer, got {type(model).__name__}")
    out = Path(out)
    if not out.parent.exists():
        raise VitkitError(f"--out {out}: the folder {out.parent} does not exist")
    model = model.eval()
    param = next(model.parameters())
    (H, W), (H2, W2) = _example_sizes(model, img_size)
    C = model.config.in_chans
    example = torch.randn(2, C, H, W, device=param.device, dtype=param.dtype)

    if format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns that the patch-divisibility checks become constants: they hold for
            # every input the graph accepts, and the two-resolution check below proves the rest.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, (example,), check_trace=False)
            traced.save(str(out))
            # Our own archive, just written; TorchScript archives hold code: load only files you made.
            run = torch.jit.load(str(out), map_location=param.device)
    else:
        program = _export_program(model, example)
        if format == "exported-program":
            torch.export.save(program, str(out))
            run = torch.export.load(str(out)).module()
        else:
            run = _write_onnx(model, program, example, out)

    report = ExportReport(path=out, format=format)
    for batch, (h, w) in ((2, (H, W)), (3, (H2, W2))):
        x = torch.randn(batch, C, h, w, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            ref = model(x)
            got = run(x)
        error = _relative_error(got.float().cpu(), ref.float().cpu())
        report.zero_logits = report.zero_logits or not bool(ref.abs().max() > 0)
        report.checks[f"{batch}x{h}x{w}"] = error
        if not error <= tolerance:  # NaN fails too
            raise VitkitError(f"{out}: exported logits differ from PyTorch's at {batch}x{h}x{w} "
                              f"(relative error {error:.1e} > {tolerance:.0e})")
    return report


def _dynamic_shapes(model: nn.Module) -> dict:
    stride = model.config.stem_stride
    batch = torch.export.Dim("batch", min=1, max=4096)
    grid_h = torch.export.Dim("grid_h", min=1, max=MAX_GRID)
    grid_w = torch.export.Dim("grid_w", min=1, max=MAX_GRID)
    # H = stride * grid_h: export then knows every input divides into whole patches.
    return {"x": {0: batch, 2: stride[0] * grid_h, 3: stride[1] * grid_w}}


def _export_program(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(model))


def _write_onnx(model: nn.Module, program: torch.export.ExportedProgram, example: Tensor, out: Path):
    """Write the ONNX file and return a callable that runs it in onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        raise VitkitError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'vitkit[export]'") from None
    import contextlib
    import io

    # The exporter narrates each stage on stdout; the report says what matters.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(program, (example,), str(out), dynamo=True, input_names=["pixel_values"],
                          output_names=["logits"], verbose=False)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return run


__all__ = ["export_model", "ExportReport", "FORMATS"]
