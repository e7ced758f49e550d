"""The throughput benchmark on the CPU with a tiny model: every field, every peer, the CLI."""

import json

import pytest
import torch

from vitkit.bench import FIELDS, benchmark_throughput, build_hf, build_timm, format_table, time_steps, timm_name
from vitkit.cli import main
from vitkit.config import ViTConfig
from vitkit.errors import VitkitError
from vitkit.variants import resolve

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10)
QUICK = dict(steps=1, repeats=2, warmup=1, matmul_tflops=1.0, device="cpu")  # CPU rows even where CUDA exists


def test_rows_have_every_field_and_ratios_against_each_peer():
    rows = benchmark_throughput(model="tiny", config=TINY, batch_size=2, precision="fp32", **QUICK)
    assert [(r["impl"], r["mode"]) for r in rows] == [
        ("vitkit", "infer"), ("timm", "infer"), ("hf", "infer"), ("vitkit", "train"), ("timm", "train"), ("hf", "train")]
    for r in rows:
        assert set(FIELDS) <= set(r)
        assert r["img_per_s"] > 0 and r["step_ms"] > 0
        assert r["img_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3))
        assert r["peak_mem_gb"] is None  # no device allocator on the CPU ...
        # ... but the process's peak RSS, which holds at least the Python runtime and torch.
        assert 0.05 < r["peak_rss_gb"] < 64 and r["peak_rss_scope"] in ("run", "process")
    for mode in ("infer", "train"):
        vit, timm_row, hf_row = [r for r in rows if r["mode"] == mode]
        assert vit["ratios"]["timm"] == pytest.approx(vit["img_per_s"] / timm_row["img_per_s"])
        assert set(vit["ratios"]) == {"timm", "hf"}
    # MFU counts a training step as three forwards, against the given 1 TFLOP/s.
    from vitkit.model import count_flops

    train = rows[3]
    assert train["mfu"] == pytest.approx(train["img_per_s"] * 3 * count_flops(TINY)["total"] / 1e12)
    table = format_table(rows)
    assert "img/s" in table and "timm=" in table and "RSS GB" in table and table.count("\n") == 8
    assert f"{rows[0]['peak_rss_gb']:.2f}" in table.splitlines()[2]


def test_peers_are_the_same_architecture():
    """Same parameter count as vitkit's: the comparison is model against model."""
    from vitkit.model import VisionTransformer

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(build_timm(TINY)) == count(VisionTransformer(TINY))
    assert count(build_hf(TINY)) == count(VisionTransformer(TINY))
    assert timm_name(resolve("ViT-S/16")) == "vit_small_patch16_224"
    x = torch.randn(2, 3, 32, 32)
    assert build_hf(TINY)(x).shape == build_timm(TINY)(x).shape == (2, 10)


def test_bf16_training_and_inference_run_with_grad_checkpointing():
    rows = benchmark_throughput(model="tiny", config=TINY, batch_size=2, precision="bf16", peers=["timm"],
                                grad_checkpointing=True, **QUICK)
    assert [r["levers"] for r in rows] == ["-", "-", "grad-checkpointing", "grad-checkpointing"]


def test_time_steps_measures_the_step():
    import time

    times = time_steps(lambda: time.sleep(0.01), device=torch.device("cpu"), steps=2, repeats=2, warmup=0)
    assert len(times) == 2 and all(0.009 < t < 0.1 for t in times)


def test_cli_prints_json_rows(capsys):
    assert main(["bench", "throughput", "--model", "ViT-Ti/16", "--img-size", "32", "--batch-size", "1",
                 "--precision", "fp32", "--peers", "timm", "--steps", "1", "--repeats", "1", "--warmup", "0",
                 "--modes", "infer", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["impl"] for r in rows] == ["vitkit", "timm"] and rows[0]["img_size"] == 32


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(VitkitError, match="--peers"):
        benchmark_throughput(model="tiny", config=TINY, peers=["jax"], **QUICK)
    with pytest.raises(VitkitError, match="--model"):
        benchmark_throughput(model="ViT-Q/16")
    assert main(["bench", "throughput", "--model", "ViT-B/16", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    for flags, named in ((["--warmup", "-1"], "--warmup -1"), (["--modes", ""], "--modes: none given")):
        assert main(["bench", "throughput", "--model", "ViT-B/16", *flags]) == 2
        assert named in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])


@pytest.mark.parametrize("flag,value,expected", [
    ("--sdpa", "bogus", "--sdpa: expected one of auto, default, cudnn, flash, efficient, math, got 'bogus'"),
    ("--device", "gpu", "--device 'gpu': expected cpu, cuda or cuda:N"),
    ("--device", "meta", "--device 'meta': expected cpu, cuda or cuda:N"),
])
def test_bad_sdpa_and_device_are_one_line_errors(capsys, flag, value, expected):
    kwargs = {"sdpa_backend" if flag == "--sdpa" else "device": value}
    with pytest.raises(VitkitError) as error:
        benchmark_throughput(model="tiny", config=TINY, peers=[], **{**QUICK, **kwargs})
    assert str(error.value) == expected
    assert main(["bench", "throughput", "--model", "ViT-Ti/16", "--img-size", "32", flag, value]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error():
    with pytest.raises(VitkitError, match="--device cuda:1: CUDA is not available here"):
        benchmark_throughput(model="tiny", config=TINY, peers=[], **{**QUICK, "device": "cuda:1"})


def test_peak_rss_is_the_measured_runs_own_where_linux_resets_it():
    # In a fresh process: the test suite's own threads and allocations would blur the marks.
    import subprocess
    import sys

    code = """
import numpy as np
from vitkit.bench import peak_rss_gb, reset_peak_rss
scope = reset_peak_rss()
before = peak_rss_gb()
block = np.ones(256 * 2 ** 20 // 8)  # 256 MiB, touched, so resident
during = peak_rss_gb()
del block
if scope == "run" and reset_peak_rss() == "run":
    assert during - before > 0.2, (before, during)  # the window's high-water mark saw the block
    assert peak_rss_gb() < during - 0.2  # a new window no longer remembers it
else:  # no reset here: the process's mark only grows
    assert during - before > 0.2 and peak_rss_gb() >= during
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_onnxruntime_peer_runs_the_exported_model_for_inference_only(capsys):
    rows = benchmark_throughput(model="tiny", config=TINY, batch_size=2, precision="fp32",
                                peers=["onnxruntime"], **QUICK)
    assert [(r["impl"], r["mode"]) for r in rows] == [("vitkit", "infer"), ("onnxruntime", "infer"), ("vitkit", "train")]
    assert rows[1]["img_per_s"] > 0 and set(rows[0]["ratios"]) == {"onnxruntime"} and rows[2]["ratios"] == {}
    assert rows[1]["peak_mem_gb"] is None and rows[1]["peak_rss_gb"] > 0.05
    rows = benchmark_throughput(model="tiny", config=TINY, batch_size=2, precision="bf16", peers=["onnxruntime"],
                                modes=["infer"], **QUICK)
    assert [r["impl"] for r in rows] == ["vitkit"]
    assert "skipping onnxruntime: measured on the CPU in fp32 only" in capsys.readouterr().err


def test_a_failing_peer_loses_its_row_not_the_run(monkeypatch, capsys):
    import vitkit.bench as bench

    def broken(config):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(bench, "build_timm", broken)
    rows = benchmark_throughput(model="tiny", config=TINY, batch_size=2, precision="fp32", peers=["timm", "hf"],
                                modes=["infer"], **QUICK)
    assert [r["impl"] for r in rows] == ["vitkit", "hf"] and set(rows[0]["ratios"]) == {"hf"}
    assert "timm infer failed, no row: RuntimeError: CUDA out of memory" in capsys.readouterr().err


def test_cpu_mfu_stays_below_one_in_half_precision_and_json_is_alone_on_stdout(capsys, monkeypatch):
    import json

    import vitkit.bench as bench

    # A CPU without fp16 units: a plain fp16 matmul runs far slower than fp32, the model's kernels not.
    rates = {torch.float16: 1e-4, torch.float32: 0.05}
    monkeypatch.setattr(bench, "measure_matmul_tflops", lambda *, device, dtype, **kw: rates[dtype])
    assert main(["bench", "throughput", "--model", "ViT-Ti/16", "--img-size", "32", "--precision", "fp16",
                 "--peers", "onnxruntime", "--modes", "infer", "--batch-size", "2", "--steps", "2", "--repeats", "1",
                 "--warmup", "1", "--device", "cpu", "--sdpa", "cudnn", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert rows and all(0 < row["mfu"] < 1 and row["matmul_tflops"] == 0.05 for row in rows)
    assert all("cudnn" not in row["levers"] for row in rows)  # no CUDA kernel ran on the CPU
    assert "skipping onnxruntime" in captured.err


def test_every_compiled_row_is_compiled_however_many_came_before(monkeypatch):
    # Dynamo keeps at most `recompile_limit` compiled versions of one forward method across model
    # instances and runs the rest eagerly, silently: with a limit of 1, the second model below
    # would be timed eagerly in a row that says "compiled". The eager backend keeps this quick.
    import functools

    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager", mode=None))
    graphs = torch._dynamo.utils.counters["stats"]
    for width in (32, 48):  # two architectures: a recompilation each
        before = graphs["unique_graphs"]
        benchmark_throughput(model="tiny", config=TINY.replace(embed_dim=width), batch_size=2, precision="fp32",
                             peers=[], modes=["infer"], compile=True, **QUICK)
        assert graphs["unique_graphs"] > before


def test_cpu_fp32_matmul_rate_is_the_faster_of_torch_and_onnxruntime(monkeypatch):
    """MFU's yardstick on the CPU must be as fast as onnxruntime's matmul, whose row it measures:
    torch's MKL matmul ran at half that rate on AVX-512 AMD EPYC cores, and the onnxruntime row's
    MFU came out at 185%."""
    import vitkit.bench as bench

    assert bench._onnxruntime_matmul_tflops(256, repeats=1) > 0  # the real measurement runs
    monkeypatch.setattr(bench, "_onnxruntime_matmul_tflops", lambda n, *, repeats: 1e3)  # far beyond torch's
    assert bench.measure_matmul_tflops(device="cpu", size=256, repeats=1, dtype=torch.float32) == 1e3
    # bf16 has no onnxruntime row to compare with: torch's own rate.
    assert bench.measure_matmul_tflops(device="cpu", size=256, repeats=1, dtype=torch.bfloat16) < 1e3
