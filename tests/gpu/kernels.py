"""Where a training step's GPU time goes: step time, MFU and a kernel-family breakdown per case.

The bench (``tests/gpu/bench.py``) says how fast a step is; this says why, so that an MFU shortfall
is traced to a kernel family (matmuls, attention, fused pointwise, pooling gathers, the loss, the
optimizer) before anything is changed. One process, cases run in turn:

    python tests/gpu/kernels.py --cases 100M:32:blocks 100M:32:model 1B:16:blocks
    python tests/gpu/kernels.py --smoke      # CPU, tiny sizes: checks the script runs

A case is ``size:batch:compile``: size ``100M`` / ``1B`` (the bench's AU-Net 2 shapes, or
``byte100M`` / ``byte1B`` for its byte Transformers), the per-device batch, and ``blocks`` (each
block compiled, what ``train.compile`` does), ``model`` (the whole forward and loss compiled in one
``torch.compile``, transitions and head included) or ``none``. Imports ``aunet`` and the bench
only: no Ray, no MLflow.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

from aunet.flops import num_params  # noqa: E402
from aunet.model import AUNet  # noqa: E402
from aunet.optim import build_optimizer  # noqa: E402
from aunet.parallel import peak_flops, shard  # noqa: E402

FAMILIES = (  # first match wins: (family, substrings of the kernel name, lower case)
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("attention", ("flex", "flash", "fmha", "attention", "triton_tem")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90", "sm80", "wgmma")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "softmax")),
    ("gather/sort/scan", ("index", "gather", "scatter", "sort", "radix", "cumsum", "scan")),
    ("fused pointwise (triton)", ("triton_",)),
    ("copy/cast/fill", ("copy", "cast", "fill", "memcpy", "memset", "cat")),
    ("elementwise (eager)", ("elementwise", "vectorized", "reduce")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def config(size: str, smoke: bool, cap: int):  # noqa: ANN201 - AUNetConfig
    configs = bench.paper_configs(smoke, cap)
    byte = size.startswith("byte")
    want = size.removeprefix("byte")
    for label, au, bt, T in configs:
        if smoke or label == f"~{want}":
            return (bt if byte else au), T
    raise SystemExit(f"kernels: unknown size {size!r} (100M, 1B, byte100M, byte1B)")


def run_case(case: str, device: torch.device, smoke: bool, windows, cap, real, top: int) -> None:  # noqa: ANN001
    size, batch, mode = case.split(":")
    B = int(batch)
    cfg, T = config(size, smoke, cap)
    gc.collect()
    bench.reset_peak(device)
    torch.manual_seed(0)
    model = AUNet(cfg).to(device)
    chosen = model.set_attention("auto", device, torch.bfloat16)
    backend = "eager" if smoke else "inductor"
    if mode == "blocks":
        shard(model, False, compile=True, compile_backend=backend)
    elif mode == "model":
        model.forward = torch.compile(model.forward, dynamic=False, backend=backend)
    elif mode != "none":
        raise SystemExit(f"kernels: compile mode {mode!r} (blocks, model, none)")
    opt = build_optimizer(model, 1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    data = bench.batches(windows, B, device)
    t = time.perf_counter()
    bench.train_steps(model, opt, data, 1, device, "bfloat16")
    bench.sync(device)
    first = time.perf_counter() - t
    n = 2 if smoke else 5
    step = bench.timed(model, opt, data, device, 1 if smoke else 2, n)
    useful = bench.useful_flops_per_s(cfg, T, B, real, step)
    peak = peak_flops(device)
    mfu = f", MFU {useful / peak:.1%}" if peak else ""
    mem = bench.peak_bytes(device) / 2**30
    print(
        f"## {case}: {num_params(cfg) / 1e6:.0f}M params, attention {chosen}, first step "
        f"{first:.1f}s, step {step * 1e3:.1f} ms, {useful / 1e12:.1f} useful TFLOP/s{mfu}, "
        f"peak {mem:.1f} GiB",
        flush=True,
    )
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        bench.train_steps(model, opt, data, 2, device, "bfloat16")
        bench.sync(device)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    attr = "self_device_time_total"
    if not events:  # CPU: the ops' own CPU time stands in for kernels
        events, attr = list(prof.key_averages()), "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    fams: dict[str, float] = defaultdict(float)
    for e in events:
        fams[family(e.key)] += getattr(e, attr)
    print(f"   device time per step {total / 2 / 1e3:.1f} ms; by family:")
    for fam, us in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"   {fam:28s} {us / 2 / 1e3:8.2f} ms  {us / total:6.1%}")
    print(f"   top {top} kernels:")
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:top]:
        us = getattr(e, attr)
        print(f"   {us / 2 / 1e3:8.2f} ms {us / total:6.1%} x{e.count // 2:<5d} {e.key[:110]}")
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=["100M:32:blocks"])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("kernels: no CUDA device; use --smoke for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    cases = ["tiny:2:blocks", "tiny:2:model"] if args.smoke else args.cases
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    _, au0, _, T = bench.paper_configs(args.smoke)[0]
    windows = bench.quickstart_windows(au0.split_strategy, T, T * 70)
    cap = bench.pooled_capacity(windows, 32 if args.smoke else 128)
    real = float(((windows[:, 1, :-1] > 0).sum(1) + 1).mean())
    print(f"# {len(windows)} windows of T={T}, pooled capacity {cap} (mean real {real:.0f})")
    for case in cases:
        t = time.perf_counter()
        try:
            run_case(case, device, args.smoke, windows, cap, real, args.top)
        except Exception as e:  # one case failing (OOM, a compile error) leaves the others
            print(f"## {case}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"# {case}: {time.perf_counter() - t:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
