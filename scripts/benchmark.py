"""Training-step throughput and memory of the faithful network against torchvision's AlexNet.

    python scripts/benchmark.py                       # the standard matrix on the GPU, table last
    python scripts/benchmark.py --models grouped torchvision --batch-sizes 256 --variants bf16-cl
    python scripts/benchmark.py --pipeline fashion-mnist   # end to end vs synthetic batches
    python scripts/benchmark.py --models grouped --variants fp32 --pipeline fashion-mnist jpeg-folder jpeg-store

Pipelines: fashion-mnist (in memory), imagenet and folder (--data, or NAME=DIR), and jpeg-folder /
jpeg-store: Fashion-MNIST written once as 256x256 JPEG files under --jpeg-dir (decoded on the CPU by
the loader's workers) and as the stored form (decoded in batches on the GPU); jpeg-store-cpu: the
stored form decoded by the workers (train_two_gpu.py --decode cpu).

Forms: the grouped network, both towers in one process (on two GPUs when there are two), towers
in two processes (NCCL on two GPUs, gloo on one), and torchvision.models.alexnet as the reference.
Every step is forward, cross-entropy, backward and the paper's SGD step on a batch already on the
device. Results go to --json; --markdown appends a dated section to a file (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from repro.bench import (  # noqa: E402
    EAGER_UPDATE_ENV,
    MODELS,
    VARIANTS,
    Case,
    Result,
    ceilings,
    numerics,
    pipeline_rate,
    run_case,
    train_flops_per_image,
)
from repro.cli import at_least, device_from_flag  # noqa: E402
from repro.model import lrn_triton  # noqa: E402

PIPELINES = ("fashion-mnist", "imagenet", "folder", "jpeg-folder", "jpeg-store", "jpeg-store-cpu")


def pipeline_data(spec: str, args) -> tuple[str, str, str | None, str]:
    """(label, dataset, data dir, where stored JPEGs decode) of a --pipeline entry (its name checked by
    parse_args); builds the JPEG tree or store when asked."""
    name, _, path = spec.partition("=")
    path = path or None
    decode = "cpu" if name == "jpeg-store-cpu" else "gpu"
    if name in ("jpeg-folder", "jpeg-store", "jpeg-store-cpu"):
        from repro.data.fashion_mnist import fashion_mnist
        from repro.data.jpeg_tree import store_of_tree, write_jpeg_tree

        splits = {"train": fashion_mnist(args.data, "train"), "val": fashion_mnist(args.data, "test")}
        workers = max(args.workers, 1)  # encoding processes too (0: in this one)
        n = args.jpeg_images
        tree = write_jpeg_tree(splits, os.path.join(args.jpeg_dir, f"tree-{n}"), {"train": n, "val": 1000}, workers)
        path = str(tree if name == "jpeg-folder" else store_of_tree(tree, os.path.join(args.jpeg_dir, f"store-{n}"), workers))
        return name, "folder", path, decode
    return name, name, path or args.data, decode


def writable_file(text: str) -> str:
    """An argparse type: a file path whose folder exists, checked before hours of timing."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} is not a file this user can write (a folder, or its "
                                         f"folder is missing or read-only)")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--device", default="auto")
    a("--models", nargs="+", default=list(MODELS), choices=MODELS)
    a("--batch-sizes", type=at_least(1), nargs="+", default=[128, 256])
    a("--variants", nargs="+", default=["fp32", "bf16-cl", "bf16-cl-compile", "bf16-cl-compile-graph"],
      choices=list(VARIANTS), help="precision / memory format / compilation / CUDA-graph combinations; "
      "'graph' captures the whole step (forward, backward, optimiser) in one CUDA graph")
    a("--steps", type=at_least(1), default=20)
    a("--warmup", type=at_least(0), default=5)
    a("--repeats", type=at_least(1), default=3, help="timings per case; the median is reported")
    a("--no-numerics", action="store_true", help="skip the bf16-vs-fp32 check")
    a("--numerics-batch", type=at_least(1), default=32)
    a("--pipeline", nargs="+", default=[], metavar="NAME[=DIR]",
      help=f"also time end-to-end training on these data against the synthetic batch; NAME one of {PIPELINES}")
    a("--data", default=None, help="the data of a pipeline given without =DIR (Fashion-MNIST's for jpeg-*)")
    a("--workers", type=at_least(0), default=8, help="loader processes decoding image files, and processes writing the "
      "JPEG tree (0: in this process)")
    a("--jpeg-dir", default="runs/bench-jpeg", help="where jpeg-folder and jpeg-store are built (once)")
    a("--jpeg-images", type=at_least(1), default=20000, help="training images in the JPEG tree (validation: 1000)")
    a("--lrn-kernel", default=None, choices=lrn_triton.KERNELS,
      help="LRN code on the GPU: triton (repro/model/lrn_triton.py; the default where installed), triton-dot "
           "(its window sums as band-matrix products) or torch (layers.py's code, fused by inductor); default "
           "from REPRO_LRN_KERNEL")
    a("--eager-update", action="store_true", help="compiled rows keep the optimiser's update eager (by default "
      "they compile it too, as training's --compile does)")
    a("--json", default=None, type=writable_file)
    a("--markdown", default=None, type=writable_file, help="append a section with the table to this file")
    args = p.parse_args(argv)
    for spec in args.pipeline:
        name, _, path = spec.partition("=")
        if name not in PIPELINES:
            p.error(f"--pipeline {spec}: unknown pipeline; one of {', '.join(PIPELINES)} (optionally NAME=DIR)")
        if name in ("imagenet", "folder") and not (path or args.data):
            p.error(f"--pipeline {name} needs its data: {name}=DIR or --data DIR")
    try:
        device_from_flag(args.device)
    except ValueError as exc:
        p.error(str(exc))
    if args.lrn_kernel is None:  # from REPRO_LRN_KERNEL, checked here rather than at the first LRN
        try:
            lrn_triton.check_choice()
        except ValueError as exc:
            p.error(str(exc))
        args.lrn_kernel = lrn_triton.current_kernel()
    return args


def environment(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    return (f"{gpu}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
            f"{time.strftime('%Y-%m-%d')}; python {platform.python_version()}")


def table(results: list[Result], reference: dict[int, float], flops: dict[str, float],
          peak_tflops: float | None) -> list[str]:
    """One row per case; "% bf16 peak" is the step's FLOP rate over the measured matrix-product rate."""
    lines = ["| case | img/s | spread | ms/step | peak MiB | x best torchvision | % bf16 peak | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = reference.get(r.case.batch)
        ratio = f"{r.img_per_s / ref:.2f}" if ref else "-"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        work = flops["torchvision" if r.case.model == "torchvision" else "ours"]
        share = f"{100 * r.img_per_s * work / (peak_tflops * 1e12):.1f}" if peak_tflops else "-"
        lines.append(f"| {r.case.label} | {r.img_per_s:,.0f} | {100 * r.spread:.1f}% | {r.step_ms:.2f} | {peak} | "
                     f"{ratio} | {share} | {r.note} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "auto" and not torch.cuda.is_available():
        print("error: no GPU. This table is for GPUs: on a CPU its default cases take hours. Use "
              "scripts/benchmark_cpu.py, or pass --device cpu with small --batch-sizes and --steps to run "
              "these cases anyway", file=sys.stderr)
        return 2
    lrn_triton.set_kernel(args.lrn_kernel)
    os.environ[lrn_triton.KERNEL_ENV] = args.lrn_kernel  # the two-process case's children
    os.environ[EAGER_UPDATE_ENV] = "1" if args.eager_update else "0"
    device = device_from_flag(args.device)
    results: list[Result] = []
    for batch in args.batch_sizes:
        for model in args.models:
            for v in args.variants:
                case = Case(model, batch, *VARIANTS[v])
                if case.graph and (device.type != "cuda" or model == "towers-2proc"):
                    print(f"{case.label}: skipped (a whole-step CUDA graph needs one process on a GPU)", flush=True)
                    continue
                try:
                    results.append(run_case(case, device, args.steps, args.warmup, args.repeats))
                except Exception as exc:  # one failing case must not lose the others
                    results.append(Result(case, float("nan"), float("nan"), None, f"failed: {type(exc).__name__}: {exc}"[:120]))
                print(f"{case.label}: {results[-1].img_per_s:,.0f} img/s {results[-1].note}", flush=True)
    best_tv = {}
    for r in results:
        if r.case.model == "torchvision" and r.img_per_s == r.img_per_s:
            best_tv[r.case.batch] = max(best_tv.get(r.case.batch, 0.0), r.img_per_s)
    extra = []

    def guarded(what: str, work):
        """work(), or None with a note: a failure after the cases must not lose their table."""
        try:
            return work()
        except Exception as exc:
            extra.append(f"{what} failed: {type(exc).__name__}: {exc}"[:200])
            return None

    if not args.no_numerics:
        mode = "default" if device.type == "cuda" else "none"
        for model in ("grouped", "torchvision"):
            errs = guarded(f"{model} numerics", lambda: numerics(device, model, batch=args.numerics_batch,
                                                                  compile_mode=mode))
            if errs is not None:
                extra.append(f"{model}: bf16 + channels_last{' + compile' if mode != 'none' else ''} vs eager fp32, "
                             "relative error: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    synthetic = None
    if args.pipeline:
        batch = max(args.batch_sizes)
        synthetic = guarded("pipeline's synthetic rate", lambda: run_case(
            Case("grouped", batch, "fp32", False, "none"), device, args.steps, args.warmup, args.repeats))
    for spec in args.pipeline if synthetic is not None else []:
        label, dataset, data, decode = pipeline_data(spec, args)
        real = guarded(f"pipeline {label}", lambda: pipeline_rate(dataset, data, device.type, batch, args.steps,
                                                                  args.warmup, workers=args.workers, decode=decode))
        if real is not None:
            extra.append(f"pipeline {label}, grouped fp32 b{batch}: end to end {real:,.0f} img/s vs synthetic "
                         f"{synthetic.img_per_s:,.0f} img/s = {real / synthetic.img_per_s:.0%}")
    kinds = sorted({"torchvision" if r.case.model == "torchvision" else "ours" for r in results})
    flops = guarded("FLOP count", lambda: {k: train_flops_per_image("towers" if k == "ours" else k)
                                           for k in kinds}) or {}
    limits = guarded("ceilings", lambda: ceilings(device)) if results else None
    peak = limits["bf16_tflops"] if limits else None
    if flops:
        extra.append("training FLOPs per image (torch FlopCounterMode): "
                     + ", ".join(f"{'this network' if k == 'ours' else k} {v / 1e9:.2f} G" for k, v in flops.items()))
    if limits:
        ceiling = f"; compute ceiling for this network {peak * 1e12 / flops['ours']:,.0f} img/s" if "ours" in flops else ""
        extra.append(f"measured here: bf16 8192^3 matrix product {peak:.0f} TFLOP/s, "
                     f"copy {limits['copy_gbps']:.0f} GB/s{ceiling}")
    lrn = ("torch" if device.type != "cuda" else args.lrn_kernel)  # the kernels run on CUDA tensors only
    env = environment(device) + {"triton": "; LRN: Triton kernels", "triton-dot": "; LRN: Triton band-matrix kernels",
                                 "torch": "; LRN: torch code (fused by inductor where compiled)"}[lrn]
    env += "; compiled rows: eager optimiser update" if args.eager_update else "; compiled rows: compiled update"
    lines = table(results, best_tv, flops, peak)
    print("\n" + env + "\n" + "\n".join(lines + [""] + extra), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": [r.row() for r in results], "notes": extra}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "a") as f:
            cmd = "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
            f.write(f"\n### {env}\n\n`{cmd}` (steps {args.steps}, warm-up {args.warmup}, median of {args.repeats})\n\n"
                    + "\n".join(lines) + "\n\n" + "\n".join(f"- {e}" for e in extra) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
