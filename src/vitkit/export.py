"""Export a ViT for serving: ONNX, TorchScript or a `torch.export` program, each taking any
batch size and any image size divisible by the patch size (the stem's stride for hybrids). The
position embeddings resample inside the graph (`resample_pos_embed` always runs when exporting),
so one file serves every resolution. Every export is loaded back and checked against PyTorch's
logits at two resolutions (onnxruntime for ONNX) before it is reported done.

Image sizes the ONNX and exported-program graphs accept: MIN_GRID to MAX_GRID patches per side
(2 to 128: 32 to 2048 px at P=16). The lower bound is torch.export's: it traces with sizes of at
least 2 and assumes a dimension never shrinks to 1 (where broadcasting would change meaning), so
a 1x1 grid is refused by the exported program's input check rather than computed.

An ONNX file holds its weights in itself up to the 2 GB protobuf limit; a larger model's weights
go to `OUT.onnx.data` beside it, which the report names (keep the two files together).

The graphs take normalised pixels; how to normalise them (resize, crop, mean, std) and the class
names travel inside every file as the text of the model's config.json (`save_pretrained`'s),
under the name "config.json": ONNX metadata (`session.get_modelmeta().custom_metadata_map`), an
extra file of the TorchScript or .pt2 archive (`_extra_files=` of torch.jit.load,
`extra_files=` of torch.export.load).
"""

from __future__ import annotations

import os
import warnings

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import VitkitError, first_line
from .pretrained import CONFIG_FILE, config_json

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
MIN_GRID = 2  # the smallest patch grid side an exported graph accepts (see the module docstring)
MAX_GRID = 128  # the largest patch grid side an exported graph accepts (2048 px at P=16)


@dataclass
class ExportReport:
    """What was written, and how far the exported model's logits are from PyTorch's."""

    path: Path
    format: str
    checks: dict[str, float] = field(default_factory=dict)  # "BxHxW" -> relative L2 error
    zero_logits: bool = False  # a zero-initialised head: the logits check could not fail
    data_path: Path | None = None  # ONNX weights over 2 GB live here, beside `path`

    @property
    def files(self) -> list[Path]:
        """Every file the export wrote; all of them are needed to load it."""
        return [self.path] + ([self.data_path] if self.data_path is not None else [])

    def __str__(self) -> str:
        checks = ", ".join(f"{k}: rel. error {v:.1e}" for k, v in self.checks.items())
        note = ("; note: the model's logits are all zero (an untrained, zero-initialised head), so the "
                "check compared zeros" if self.zero_logits else "")
        wrote = (f"{self.path} and its weights {self.data_path} (keep the two files together)"
                 if self.data_path is not None else str(self.path))
        return f"wrote {wrote} ({self.format}); checked against PyTorch at {checks}{note}"


def _example_sizes(model: nn.Module, img_size: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """The tracing example's (H, W) and a second, different grid to check the export at."""
    config = model.config
    stride = config.stem_stride
    H, W = (img_size, img_size) if img_size is not None else config.img_size
    what = f"--img-size {img_size}" if img_size is not None else f"the model's image size {H}x{W} (set --img-size)"
    step = f"{stride[0]}" if stride[0] == stride[1] else f"{stride[0]}x{stride[1]} (height x width)"
    if H % stride[0] or W % stride[1]:
        raise VitkitError(f"{what}: must be divisible by the model's stride {step}")
    grid = (H // stride[0], W // stride[1])
    if not all(MIN_GRID <= g <= MAX_GRID for g in grid):
        sides = " and ".join(dict.fromkeys(f"{MIN_GRID * s} to {MAX_GRID * s} px" for s in stride))
        raise VitkitError(f"{what}: exported graphs take {MIN_GRID} to {MAX_GRID} patches per side: "
                          f"{sides} at stride {step}")
    # The check's second grid is larger, and non-square, unless that would pass the maximum.
    h2 = grid[0] + 2 if grid[0] + 2 <= MAX_GRID else grid[0] - 2
    w2 = grid[1] + 1 if grid[1] + 1 <= MAX_GRID else grid[1] - 1
    return (H, W), (h2 * stride[0], w2 * stride[1])


def _relative_error(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def export_model(model: nn.Module, *, format: str, out: str | Path, img_size: int | None = None,
                 tolerance: float = 1e-4) -> ExportReport:
    """Write `model` (a vitkit VisionTransformer, in float32) to `out` as `format` (see FORMATS)
    with a dynamic batch and image size, load the file back, and check its logits against the
    model's at the example size (`img_size`, default the model's) and at a larger, non-square one.
    Raises VitkitError if the relative L2 error exceeds `tolerance` at either.

    Exported graphs are for MIN_GRID to MAX_GRID patches per side (2 to 128): the example size
    must lie in that range, and the ONNX and exported-program graphs are built for exactly it (the
    exported program refuses other sizes when called). A model whose position embeddings resample
    with 'area' interpolation is refused for ONNX, which can express that only at a fixed size."""
    if format not in FORMATS:
        raise VitkitError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if not hasattr(model, "config"):
        raise VitkitError(f"export needs a vitkit VisionTransformer, got {type(model).__name__}")
    out = Path(out)
    if out.is_dir():
        example_file = out / ("model" + SUFFIXES[format])
        raise VitkitError(f"--out {out}: is a folder; give the file to write, e.g. {example_file}")
    if not out.parent.exists():
        raise VitkitError(f"--out {out}: the folder {out.parent} does not exist")
    if format == "exported-program" and out.suffix != ".pt2":  # torch.export.load knows the format by it
        raise VitkitError(f"--out {out}: an exported program is written as a .pt2 file; name it {out.name}.pt2")
    if format == "onnx" and model.config.pos_embed_interpolation == "area":
        # torch lowers area resizing to an adaptive average pool, which ONNX has only with a fixed
        # output size: the graph would be pinned to the example's grid and fail at any other.
        raise VitkitError("--format onnx: the model resamples its position embeddings with 'area' interpolation, "
                          "which cannot be exported to ONNX with dynamic image sizes; use pos_embed_interpolation "
                          "bicubic or bilinear, or --format exported-program / torchscript")
    model = model.eval()
    param = next(model.parameters())
    (H, W), (H2, W2) = _example_sizes(model, img_size)
    C = model.config.in_chans
    example = torch.randn(2, C, H, W, device=param.device, dtype=param.dtype)
    # Written beside `out` and put in its place only once checked: a failed export or check never
    # destroys a file already there.
    final, out = out, out.with_name(f".{out.stem}.partial-{os.getpid()}{out.suffix}")
    try:
        report = _write_and_check(model, format=format, out=out, example=example, sizes=((H, W), (H2, W2)),
                                  tolerance=tolerance, final=final)
    except (OSError, RuntimeError) as error:
        what = "cannot be written" if isinstance(error, OSError) or "inline_container" in str(error) else "export failed"
        raise VitkitError(f"--out {final}: {what} ({first_line(error)})") from None
    finally:
        for partial in (out, out.with_name(out.name + ".data")):  # and the ONNX weights file, if it got that far
            partial.unlink(missing_ok=True)
    return report


def _write_and_check(model: nn.Module, *, format: str, out: Path, example: Tensor,
                     sizes: tuple[tuple[int, int], tuple[int, int]], tolerance: float, final: Path) -> ExportReport:
    param = next(model.parameters())
    C = example.shape[1]
    (H, W), (H2, W2) = sizes
    data_path = None
    metadata = {CONFIG_FILE: config_json(model)}
    if format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns that the patch-divisibility checks become constants: they hold for
            # every input the graph accepts, and the two-resolution check below proves the rest.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, (example,), check_trace=False)
            traced.save(str(out), _extra_files=metadata)
            # Our own archive, just written; TorchScript archives hold code: load only files you made.
            run = torch.jit.load(str(out), map_location=param.device)
    else:
        program = _export_program(model, example)
        if format == "exported-program":
            torch.export.save(program, str(out), extra_files=metadata)
            run = torch.export.load(str(out)).module()
        else:
            run, data_path = _write_onnx(model, program, example, out, metadata)

    final_data = None if data_path is None else final.with_name(final.name + ".data")
    report = ExportReport(path=final, format=format, data_path=final_data)
    for batch, (h, w) in ((2, (H, W)), (3, (H2, W2))):
        x = torch.randn(batch, C, h, w, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            ref = model(x)
            got = run(x)
        error = _relative_error(got.float().cpu(), ref.float().cpu())
        report.zero_logits = report.zero_logits or not bool(ref.abs().max() > 0)
        report.checks[f"{batch}x{h}x{w}"] = error
        if not error <= tolerance:  # NaN fails too
            raise VitkitError(f"{final}: exported logits differ from PyTorch's at {batch}x{h}x{w} "
                              f"(relative error {error:.1e} > {tolerance:.0e}); nothing written")
    if data_path is not None:
        _rename_external_data(out, data_path, final_data)
    os.replace(out, final)
    return report


def _rename_external_data(onnx_path: Path, data_path: Path, new_data_path: Path) -> None:
    """Move an ONNX model's external weights file, and point the model's tensors at its new name
    (the .onnx records the file by name: renaming the data alone would orphan the weights)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data_path.name:
                entry.value = new_data_path.name
    onnx.save(proto, str(onnx_path))
    os.replace(data_path, new_data_path)


def _dynamic_shapes(model: nn.Module) -> dict:
    stride = model.config.stem_stride
    batch = torch.export.Dim("batch", min=1, max=4096)
    # min=1 would be a promise the program cannot keep: export specialises every dynamic size
    # against 1, so a 1-patch side failed later with a bare "Guard failed". Say the real minimum.
    grid_h = torch.export.Dim("grid_h", min=MIN_GRID, max=MAX_GRID)
    grid_w = torch.export.Dim("grid_w", min=MIN_GRID, max=MAX_GRID)
    # H = stride * grid_h: export then knows every input divides into whole patches.
    return {"x": {0: batch, 2: stride[0] * grid_h, 3: stride[1] * grid_w}}


def _export_program(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(model))


def _write_onnx(model: nn.Module, program: torch.export.ExportedProgram, example: Tensor, out: Path,
                metadata: dict[str, str]):
    """Write the ONNX file with `metadata` as its metadata_props; return a callable that runs it in onnxruntime, and the path of the
    external weights file if the model was too large to hold its weights in the .onnx (else None)."""
    try:
        import onnxruntime
    except ImportError:
        raise VitkitError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'vitkit[export]'") from None
    import contextlib
    import io

    # The weights go inside the .onnx (external_data=False), so the one file is the whole model;
    # torch's default put them in a hidden OUT.onnx.data that a copy of OUT.onnx alone lost.
    # Past protobuf's 2 GB limit the exporter writes OUT.onnx.data anyway; we then report it.
    # The exporter narrates each stage on stdout; the report says what matters.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(program, (example,), str(out), dynamo=True, input_names=["pixel_values"],
                          output_names=["logits"], verbose=False, external_data=False)
    import onnx

    proto = onnx.load(str(out), load_external_data=False)  # an external weights file stays as it is
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(out))
    data_path = _external_data(out)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return run, data_path


def _external_data(path: Path) -> Path | None:
    """The external weights file the ONNX model at `path` reads, or None if it holds its own.
    The file name alone cannot say: an OUT.onnx.data may be left over from an earlier export."""
    data_path = path.with_name(path.name + ".data")
    if not data_path.exists():
        return None
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    return data_path if external else None


__all__ = ["export_model", "ExportReport", "FORMATS", "MIN_GRID", "MAX_GRID"]
