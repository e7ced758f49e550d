"""The `vitkit` command: argparse subcommands only. Each one parses, then calls a library function.

Exit codes: 0 success; 1 some inputs failed (predict/eval report which); 2 a usage error or a
file that cannot be used, reported in one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .errors import VitkitError
from .pretrained import load_or_create, names_weights

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line naming the argument."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architecture, parameters and FLOPs of a model",
                       description="Show a model's architecture, parameters by component and forward FLOPs per image.")
    p.add_argument("source", help="a variant name (ViT-B/16, vit_base_patch16_224, base) or any load_pretrained source")
    p.add_argument("--model", help="variant name, for weight files that cannot say the whole architecture")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from .info import describe

    model = load_or_create(args.source, model=args.model)
    print(describe(model))
    return EXIT_OK


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model names create_model accepts",
                       description="List every model name (paper, timm and short forms), optionally filtered.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'ViT-B/*' or '*r50*'")
    p.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    import fnmatch

    from . import list_models

    names = [n for n in list_models() if fnmatch.fnmatch(n.lower(), args.pattern.lower())]
    if not names:
        raise VitkitError(f"no model name matches {args.pattern!r}; `vitkit models` lists them all")
    print("\n".join(names))
    return EXIT_OK


# ---------------------------------------------------------------------------- convert
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="write a model's weights in another format (vitkit, hf, timm, npz)",
                       description="Load SRC (any load_pretrained source) and write it to DST in the format --to: "
                                   "vitkit or hf (directories), timm (.safetensors/.pth), npz (the JAX layout).")
    p.add_argument("source", help="a vitkit/HF directory, hf-hub:ORG/NAME, a timm .safetensors/.pth, or a JAX .npz")
    p.add_argument("destination", help="output directory (vitkit, hf) or file (timm, npz)")
    p.add_argument("--to", required=True, choices=("vitkit", "hf", "timm", "npz"), help="the output format")
    p.add_argument("--model", help="variant name, for weight files that cannot say the whole architecture")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    written = convert(source=args.source, destination=args.destination, to=args.to, model=args.model)
    print(f"wrote {written} ({args.to})")
    return EXIT_OK


# ---------------------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 and per-class accuracy of a model on a dataset",
                       description="Evaluate a model with its stored preprocessing: top-1, top-5, per-class accuracy, "
                                   "and a confusion-matrix PNG in --out.")
    p.add_argument("source", help="a run directory (RUN/best is used), a checkpoint, or any load_pretrained source")
    p.add_argument("--data", help="ImageFolder folder or .tar/.tar.gz/.zip, cifar10[:ROOT], cifar100[:ROOT] "
                                  "(default: the built-in CIFAR-10 sample)")
    p.add_argument("--split", default="val", choices=("val", "test", "train"), help="val falls back to test")
    p.add_argument("--model", help="variant name, for weight files that cannot say the whole architecture")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default %(default)s)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads/processes (default: all cores)")
    p.add_argument("--out", help="folder for metrics.json and confusion.png")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5, n, ...) as the last line")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from .infer import evaluate_source

    model = load_or_create(args.source, model=args.model)
    result = evaluate_source(model, source=args.source, data=args.data, batch_size=args.batch_size,
                             device=args.device, split=args.split, out=args.out, strict=args.strict,
                             workers=args.workers)
    status = EXIT_PARTIAL if result["skipped"] else EXIT_OK
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "confusion"}))
        return status
    print(f"top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  on {result['n']} images"
          + (f" ({len(result['skipped'])} unreadable, skipped)" if result["skipped"] else ""))
    for name, accuracy in result["per_class"].items():
        print(f"  {name:<24}{'-' if accuracy is None else f'{accuracy:.2%}':>8}")
    if "confusion_png" in result:
        print(f"confusion matrix: {result['confusion_png']}")
    return status


# ---------------------------------------------------------------------------- predict
def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="class probabilities for image files, folders or globs",
                       description="Classify images with the model's stored preprocessing. Exit 1 when any input "
                                   "could not be read (the others are still classified).")
    p.add_argument("source", help="a run directory, a checkpoint, or any load_pretrained source")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--model", help="variant name, for weight files that cannot say the whole architecture")
    p.add_argument("--top-k", type=int, default=5, help="predictions per image, most likely first (default %(default)s)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import json

    from .images import list_images
    from .infer import iter_predict

    paths = list_images(args.images)
    if not paths:
        raise VitkitError(f"no images found in {' '.join(args.images)}")
    model = load_or_create(args.source, model=args.model)
    failed = False
    for result in iter_predict(model, paths, top_k=args.top_k, device=args.device):
        failed = failed or "error" in result
        if args.json:
            print(json.dumps(result), flush=True)
        elif "error" in result:
            # The error names the file already: "a.jpg: error: no such file", not "a.jpg: error: a.jpg: ...".
            print(f"{result['path']}: error: {result['error'].removeprefix(result['path'] + ': ')}", flush=True)
        else:
            print(f"{result['path']}: " + ", ".join(f"{p['label']} {p['prob']:.3f}" for p in result["predictions"]),
                  flush=True)
    return EXIT_PARTIAL if failed else EXIT_OK


# ---------------------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: throughput against timm and HF, ...",
                       description="Benchmarks. Each kind of benchmark is a subcommand of its own.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK", parser_class=_Parser)
    for add in _BENCH_COMMANDS:
        add(kinds)


def _add_bench_throughput(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("throughput", help="images/s, MFU and peak memory of vitkit vs timm, HF and onnxruntime",
                         description="Inference and training-step throughput of vitkit and its peers (timm, HF "
                                     "transformers) in one process on one device, with MFU and peak memory.")
    p.add_argument("--model", default="ViT-B/16", help="variant name (default ViT-B/16)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default %(default)s)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="bf16 (the default, the GPU goal's precision), fp16, or fp32 (use it on a CPU without bf16 units)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (the same mode for all)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode with --compile, the same for every model (reduce-overhead: CUDA graphs)")
    p.add_argument("--peers", default="timm,hf", help="comma list of timm, hf, onnxruntime (CPU fp32 inference); '' for vitkit alone")
    p.add_argument("--img-size", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement (default %(default)s; a compiled run warms up at least once)")
    p.add_argument("--modes", default="infer,train", help="comma list of infer, train")
    p.add_argument("--sdpa", default="auto", help="vitkit's attention kernel: auto, default, cudnn, flash, efficient, math")
    p.add_argument("--grad-checkpointing", action="store_true", help="for every model's training step")
    p.add_argument("--fp8", action="store_true",
                   help="vitkit's encoder matmuls in FP8 (opt-in; changes the numbers; GPUs of compute capability 8.9+)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(run=_run_bench_throughput)


def _run_bench_throughput(args: argparse.Namespace) -> int:
    import json

    from .bench import benchmark_throughput, format_table

    rows = benchmark_throughput(
        model=args.model, batch_size=args.batch_size, precision=args.precision, compile=args.compile,
        compile_mode=args.compile_mode, peers=[p for p in args.peers.split(",") if p], img_size=args.img_size,
        device=args.device, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
        modes=[m for m in args.modes.split(",") if m], sdpa_backend=args.sdpa,
        grad_checkpointing=args.grad_checkpointing, fp8=args.fp8)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return EXIT_OK


def _add_bench_cifar10(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("cifar10", help="time to accuracy: train a small ViT on CIFAR-10, test accuracy per epoch",
                         description="Train a small ViT from scratch on the CIFAR-10 JPEG archive and print the test "
                                     "accuracy after every epoch against the seconds of training (compile excluded).")
    p.add_argument("--data", help="cifar10-jpeg.tar.gz (default: ../shared/data/ or .data/)")
    p.add_argument("--model", default="vit_cifar_conv", help="a registered model name (default %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs, unless --time-budget sets them (default %(default)s)")
    p.add_argument("--time-budget", type=float, metavar="S", help="seconds of training; sets --epochs from the step time")
    p.add_argument("--batch-size", type=int, default=512, help="images per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay, not on norms, biases and tokens (default %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=2.0, help="linear LR warm-up before the cosine decay (default %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the loss (default %(default)s)")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block (default %(default)s)")
    p.add_argument("--augment", choices=("randaugment", "trivialaugment"), help="on top of crop + flip")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    p.add_argument("--tta", choices=("none", "flip", "translate"), default="translate",
                   help="test-time views averaged: the image, + its mirror (flip), + both moved 1 px (translate; "
                        "the default)")
    p.add_argument("--no-tta", dest="tta", action="store_const", const="none", help=argparse.SUPPRESS)  # = --tta none
    p.add_argument("--no-compile", action="store_true", help="run eagerly (torch.compile is on by default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and augmentation (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="ViTConfig override, e.g. --set depth=4 --set 'hybrid_stem={...}'")
    p.add_argument("--engine", choices=("benchmark", "library"), default="benchmark",
                   help="the stripped fast loop (default) or vitkit.train.train")
    p.add_argument("--max-train", type=int, help="a random subset of this many training images (smoke runs)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (0: one per core)")
    p.add_argument("--device", help="cuda, cpu (default: cuda if available)")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.set_defaults(run=_run_bench_cifar10)


def _run_bench_cifar10(args: argparse.Namespace) -> int:
    import json

    from .time_to_accuracy import Recipe, run_cifar10

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            raise VitkitError(f"--set {item!r}: expected KEY=JSON, e.g. depth=4") from None
    recipe = Recipe(model=args.model, epochs=args.epochs, time_budget=args.time_budget, batch_size=args.batch_size,
                    lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                    label_smoothing=args.label_smoothing, drop_path=args.drop_path, augment=args.augment,
                    mixup=args.mixup, cutmix=args.cutmix, tta=args.tta,
                    compile=not args.no_compile, seed=args.seed, overrides=overrides)
    result = run_cifar10(recipe=recipe, data=args.data, engine=args.engine, device=args.device,
                         max_train=args.max_train, workers=args.workers, log=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return EXIT_OK


# `vitkit bench KIND`: append an `_add_bench_<kind>(kinds)` here to add a benchmark.
_BENCH_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_bench_throughput, _add_bench_cifar10]


# ---------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export to ONNX, TorchScript or a torch.export program",
                       description="Export a model with dynamic batch and image size (position embeddings resample "
                                   "inside the graph), checked against PyTorch's logits at two resolutions.")
    p.add_argument("source", help="a variant name or any load_pretrained source")
    p.add_argument("--model", help="variant name, for weight files that cannot say the whole architecture")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "exported-program"), help="onnx (checked in onnxruntime), torchscript (.pt) or exported-program (.pt2)")
    p.add_argument("--out", required=True, help="the file to write (.onnx, .pt, .pt2)")
    p.add_argument("--img-size", type=int, help="the example image side used for tracing (default: the model's); "
                                                "the exported model takes any size of 2 to 128 patches per side")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_model

    model = load_or_create(args.source, model=args.model)
    report = export_model(model, format=args.format, out=args.out, img_size=args.img_size)
    print(report)
    return EXIT_OK


# ---------------------------------------------------------------------------- explain
def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="the paper's figures and an illustrated walkthrough, as PNGs and one HTML report",
                       description="Run a model on images and write the paper's analysis figures (patches, "
                                   "embedding filters, position similarity, attention distance, class attention, "
                                   "rollout, predictions) as PNGs plus a self-contained report.html.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True, metavar="SOURCE",
                   help="a run directory, checkpoint, any load_pretrained source, or a variant name (random weights)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and report.html")
    p.add_argument("--arch", metavar="NAME",
                   help="the variant, for weight files that cannot say the whole architecture (timm state dicts)")
    p.add_argument("--rollout-fusion", choices=("mean", "max", "min"), default="mean",
                   help="how attention rollout merges heads (default mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="fraction of each row's weakest attention dropped before rollout (default 0)")
    p.add_argument("--top-k", type=int, default=5, help="predictions shown per image (default 5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.set_defaults(run=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    model = load_or_create(args.model, model=args.arch)
    result = explain(images=args.images, model=model, out_dir=args.out, fusion=args.rollout_fusion,
                     discard_ratio=args.discard_ratio, top_k=args.top_k, device=args.device, source=args.model)
    print(f"wrote {len(result.figures)} figures and {result.report}")
    for problem in result.skipped:
        print(f"vitkit explain: skipped {problem}", file=sys.stderr)
    return EXIT_PARTIAL if result.skipped else EXIT_OK


# ---------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train or fine-tune a ViT; resume a run",
        description="Train a ViT on a folder or archive of images (DIR/train/<class>/*.jpg, DIR/val/...), or with no "
                    "--data on the embedded CIFAR-10 sample. Writes a run directory (config.json, metrics.jsonl, "
                    "plots, best/ and last/ checkpoints, summary.json). Unset options come from the recipe. "
                    "Several GPUs: torchrun --nproc-per-node N -m vitkit train ...")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="variant name (ViT-B/16, vit_base_patch16_224, base, vit_cifar, ...); "
                                   "default: the recipe's small-image ViT")
    g.add_argument("--init", help="start from weights: any load_pretrained source (run dir, vitkit dir, timm file, "
                                  "hf-hub:ORG/NAME); the head is replaced unless the data has exactly its classes")
    g.add_argument("--patch-size", type=int, help="patch size in pixels (fresh models only)")
    g.add_argument("--img-size", type=int, help="input size in pixels; default: the model's")
    g.add_argument("--data", help="image folder or archive with train/ and val/ (or test/) splits, or cifar10, "
                                  "cifar100 (cifar10:DIR for local files); default: the embedded CIFAR-10 sample")
    g.add_argument("--max-train", type=int, help="train on a random subset of this many images")
    g.add_argument("--workers", type=int, default=0, help="image decoding processes for data streamed from disk")
    g.add_argument("--strict", action="store_true", default=None,
                   help="stop at the first unreadable image instead of skipping it")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory (default runs/<timestamp>-<model>)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    g.add_argument("--recipe", help="named recipe: cifar (default), finetune (default with --init), deit")
    g.add_argument("--epochs", "--num_epochs", dest="epochs", type=int, help="epochs to train")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int,
                   help="global images per forward pass, across all processes")
    g.add_argument("--grad-accum", type=int, help="forward passes per optimiser step (effective batch = "
                                                  "batch size x grad accum)")
    g.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    g.add_argument("--device", help="cpu, cuda, cuda:1; default: a GPU if there is one")
    g.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                   help="bf16 autocast (default on GPUs that have it), fp16 with loss scaling, or fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also save RUN/last every STEPS optimiser steps (it is always saved each epoch)")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None, help="shard weights and optimiser state across "
                                                                     "processes (FSDP2) instead of replicating them")
    g.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass: less memory, ~30%% more time")
    g.add_argument("--fp8", action="store_true", default=None,
                   help="the encoder's matmuls in FP8 (e4m3 forward, e5m2 gradients), for the FP8 tensor cores "
                        "of GPUs of compute capability 8.9+; slow on the CPU; validation runs in FP8 too; "
                        "weights are saved as usual")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g = p.add_argument_group("recipe knobs (default: the recipe's value)")
    g.add_argument("--lr", type=float, help="peak learning rate after warmup (AdamW)")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (not on norms, biases, tokens, pos-embed)")
    g.add_argument("--warmup-epochs", type=float, help="epochs of linear LR warmup")
    g.add_argument("--label-smoothing", type=float, help="label smoothing epsilon, e.g. 0.1")
    g.add_argument("--augment", choices=("none", "randaugment", "trivialaugment"),
                   help="augmentation on top of random crop + flip; none turns off crop and flip too")
    g.add_argument("--mixup", type=float, help="mixup alpha (0 off), e.g. 0.8")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (0 off), e.g. 1.0")
    g.add_argument("--random-erasing", type=float, help="random erasing probability per image, e.g. 0.25")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate of the last block, e.g. 0.1")
    g.add_argument("--clip-grad", type=float, help="clip the global gradient norm to this value")
    g.add_argument("--ema", type=float, metavar="DECAY", help="keep an EMA of the weights with this decay per step "
                                                              "(e.g. 0.999); best/ then holds the EMA weights")
    g.add_argument("--layer-decay", type=float, help="layer-wise LR decay for fine-tuning, e.g. 0.75")
    g.add_argument("--distill-from", metavar="TEACHER",
                   help="DeiT distillation from this teacher (load_pretrained source or torchvision:NAME)")
    g.add_argument("--distill-type", choices=("hard", "soft"), help="DeiT's hard-label or soft (KL) distillation")
    g.add_argument("--distill-alpha", type=float, metavar="WEIGHT",
                   help="the teacher's share of the loss, in [0, 1] (default 0.5 hard, 0.1 soft, as DeiT)")
    g.add_argument("--distill-tau", type=float, metavar="T", help="soft distillation temperature (default 3.0, as DeiT)")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    fields = {f for f in TrainConfig.__dataclass_fields__}
    summary = train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    if summary.get("skipped_images"):
        print(f"vitkit train: {summary['skipped_images']} unreadable image(s) were skipped (listed in the warning above)",
              file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


# ---------------------------------------------------------------------------- pretrain
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pre-training (MAE) on unlabelled images",
                       description="Masked-autoencoder pre-training (He et al., 2021): the encoder sees 25% of each "
                                   "image's patches, a small decoder paints the rest. Writes OUT/last (the encoder, "
                                   "for `vitkit train --init OUT`), OUT/reconstructions/*.png and OUT/metrics.jsonl.")
    p.add_argument("--method", default="mae", choices=("mae",), help="pre-training method (default mae)")
    p.add_argument("--model", help="variant name (vit_cifar, ViT-S/16, ...) or a load_pretrained source to "
                                   "continue from (required unless --resume)")
    p.add_argument("--data", help="a folder or archive of images in any layout (labels ignored); default: the "
                                  "built-in CIFAR-10 sample")
    p.add_argument("--out", help="run directory (required unless --resume)")
    p.add_argument("--resume", metavar="RUN", help="continue a pre-training run from its last epoch, with its "
                                                   "settings (--epochs and --device may change)")
    # No argparse defaults (pretrain_mae's apply): --resume must see which settings were given to refuse them.
    p.add_argument("--epochs", type=int, help="default 100")
    p.add_argument("--batch-size", type=int, help="images per step (default 256)")
    p.add_argument("--lr", type=float, help="base LR per 256 images (scaled with --batch-size; default 1.5e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup-epochs", type=int, help="linear LR warm-up epochs (default 5)")
    p.add_argument("--mask-ratio", type=float, help="fraction of patches hidden per image (default 0.75)")
    p.add_argument("--decoder-dim", type=int, help="the MAE decoder's width (default 128)")
    p.add_argument("--decoder-depth", type=int, help="the MAE decoder's blocks (default 4)")
    p.add_argument("--decoder-heads", type=int, help="the MAE decoder's attention heads (default 4)")
    p.add_argument("--patch-size", type=int, help="patch size in pixels (fresh models only)")
    p.add_argument("--img-size", type=int, help="input size in pixels; default: the model's")
    p.add_argument("--max-train", type=int, help="use a random subset of this many training images")
    p.add_argument("--device", help="cpu, cuda, cuda:1; default: a GPU if there is one")
    p.add_argument("--seed", type=int, help="seed of the weights, masks and data order (default 0)")
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .mae import pretrain_mae
    from .variants import resolve

    knobs = ("batch_size", "lr", "weight_decay", "warmup_epochs", "mask_ratio", "decoder_dim", "decoder_depth",
             "decoder_heads", "seed")
    if args.resume:
        fixed = [f"--{name.replace('_', '-')}" for name in ("model", "out", "data", "patch_size", "img_size", "max_train",
                                                            *knobs) if getattr(args, name) is not None]
        if fixed:
            raise VitkitError(f"--resume continues a run with its own settings; {', '.join(fixed)} cannot change")
        result = pretrain_mae(out=args.resume, resume=True, epochs=args.epochs, device=args.device)
        print(f"encoder: {result.run_dir / 'last'}  (fine-tune: vitkit train --init {result.run_dir} ...)")
        return EXIT_OK
    missing = [flag for flag, value in (("--model", args.model), ("--out", args.out)) if not value]
    if missing:
        raise VitkitError(f"{' and '.join(missing)} required (or --resume RUN)")
    overrides = {k: v for k, v in (("patch_size", args.patch_size), ("img_size", args.img_size)) if v is not None}
    if names_weights(args.model):
        if overrides:
            raise VitkitError("--patch-size/--img-size apply to fresh models, not to --model " + args.model)
        model = load_or_create(args.model)
    else:
        try:
            model = resolve(args.model).replace(num_classes=0, **overrides)
        except ValueError as error:
            given = " with " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()) if overrides else ""
            raise VitkitError(f"--model {args.model}{given}: {error}") from None
    given = {name: getattr(args, name) for name in knobs if getattr(args, name) is not None}
    result = pretrain_mae(model=model, out=args.out, data=args.data, epochs=args.epochs, device=args.device,
                          max_train=args.max_train, **given)
    print(f"encoder: {result.run_dir / 'last'}  (fine-tune: vitkit train --init {result.run_dir} ...)")
    return EXIT_OK


# ---------------------------------------------------------------------------- main
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info, _add_models, _add_convert, _add_train, _add_bench, _add_export, _add_explain, _add_eval, _add_predict, _add_pretrain]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitkit", description="Vision Transformers: build, load, train, inspect and ship.",
                     epilog=f"Exit status: {EXIT_OK} all good; {EXIT_PARTIAL} some input images could not be read and "
                            f"were skipped (predict, eval, train, explain; the rest were processed); {EXIT_USAGE} a usage or "
                            "input error, told in one line on stderr; 130 interrupted.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in _COMMANDS:
        add(sub)
    return parser


def _is_first_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _stdout_is_closed() -> bool:
    """Whether stdout's reader went away. An unbuffered stdout (PYTHONUNBUFFERED) holds nothing to
    flush, so only the pipe itself can say: its write end polls as an error once the reader closed."""
    try:
        sys.stdout.write("")
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured), or no poll
        return False


def _rank_label() -> str:
    """" [rank N]" for the other processes of a torchrun job: an error only one process meets
    (its shard of the data, its GPU) must still be told, and the label says whose it is."""
    return "" if _is_first_process() else f" [rank {os.environ['RANK']}]"


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    formatted = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):  # noqa: ARG001
        # A user reads "vitkit eval: warning: skipped 2 unreadable image(s): ...", not our source lines.
        return f"vitkit {args.command}: warning: {message}\n" if _is_first_process() else ""

    warnings.formatwarning = one_line
    try:
        return _run(args)
    finally:
        warnings.formatwarning = formatted


def _run(args: argparse.Namespace) -> int:
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit-time flush
        return code
    except VitkitError as error:
        print(f"vitkit {args.command}: error{_rank_label()}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError as error:
        if not _stdout_is_closed():
            # Another pipe (a data-loader worker's, say) broke: a real failure.
            print(f"vitkit {args.command}: error{_rank_label()}: {error.strerror or error}", file=sys.stderr)
            return EXIT_USAGE
        # The reader went away (`vitkit models | head`): not an error of ours. Point stdout at
        # devnull so Python's exit-time flush does not raise again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass  # stdout is not a real file (captured); nothing will flush to the pipe
        return EXIT_OK
    except OSError as error:
        # A path that cannot be written or read (a file where a directory should be, no
        # permission, a full disk): one line naming it, not a traceback.
        where = f"{error.filename}: " if error.filename else ""
        why = error.strerror or str(error)
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            why += " (a file stands where a directory is needed)"
        print(f"vitkit {args.command}: error{_rank_label()}: {where}{why}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
