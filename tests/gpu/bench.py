"""GPU checks of the training path in one process: one table for docs/performance.md.

Run by tests/gpu/run.sh on a CUDA machine; ``--smoke`` runs the same code on CPU with tiny sizes
(about a minute) so it is verified without a GPU. Imports ``aunet`` only (no Ray, no MLflow): the
device machine has torch, numpy and regex, not the platform's services.

Sections, each in its own try/except so a failure prints and the rest still runs; every row is
printed as soon as it is measured:

1. attention: FlexAttention (and flash-attn when installed) vs SDPA on the same inputs, bf16;
2. throughput: AU-Net 2 and a byte Transformer of the same FLOPs per byte at ~100M and ~1B
   parameters (seq 8192, the paper's windows): step time eager and with compiled blocks (the
   compile speedup), bytes/s, useful FLOP/s (``aunet.flops`` at the real pooled positions; the
   pooled capacity is taken from the bench's windows so little is padding), MFU against the bf16
   peak (``aunet.parallel.PEAK_BF16_FLOPS``), and the peak memory of the eager and of the
   compiled steps against ``aunet.memory``'s eager and compiled estimates;
3. bf16 vs fp32: the loss after N steps on the quickstart corpus from the same initial weights.

bf16 here is ``torch.autocast`` over fp32 weights (one device, no process group); the training
pipeline gets the same numerics from FSDP2's ``MixedPrecisionPolicy`` (``aunet.parallel.shard``).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import resource
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aunet.config import AUNetConfig  # noqa: E402
from aunet.flops import flops_per_byte, num_params, size_for_flops_per_byte  # noqa: E402
from aunet.layers import attention  # noqa: E402
from aunet.memory import training_memory  # noqa: E402
from aunet.model import AUNet  # noqa: E402
from aunet.optim import build_optimizer, clip_gradients  # noqa: E402
from aunet.packing import encode_document  # noqa: E402
from aunet.parallel import peak_flops, shard  # noqa: E402
from aunet.splitting import Splitter  # noqa: E402

ROWS: list[tuple[str, str, str]] = []  # (section, item, value)
T0 = time.perf_counter()


OUT: Path | None = None  # where performance.md is rewritten after every row


def table() -> str:
    lines = ["| section | item | value |", "|---|---|---|"]
    return "\n".join(lines + [f"| {s} | {i} | {v} |" for s, i, v in ROWS]) + "\n"


def emit(section: str, item: str, value: str) -> None:
    """Print a row at once and rewrite $OUT/performance.md, so a run cut short keeps its rows."""
    ROWS.append((section, item, value))
    print(f"| {section} | {item} | {value} |", flush=True)
    if OUT is not None:
        (OUT / "performance.md").write_text(table())


def elapsed() -> float:
    return time.perf_counter() - T0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # RSS, Linux KiB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def amp(device: torch.device, dtype: str):  # noqa: ANN201 - a context manager
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------- data
def quickstart_windows(strategy: dict[str, str], seq_len: int, max_bytes: int) -> np.ndarray:
    """(N, 2, seq_len + 1) int64 windows (tokens, levels) of the quickstart corpus, packed like
    ``aunet.packing`` (BOS/EOS per document, windows overlapping by one)."""
    path = ROOT / "experiments/data/quickstart.jsonl.gz"
    splitter = Splitter(strategy) if strategy else None
    toks, levs, total = [], [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            data = json.loads(line)["text"].encode("utf-8")
            lev = splitter.levels(data) if splitter else np.zeros(len(data), np.uint8)
            t, lv = encode_document(data, lev, len(strategy))
            toks.append(t)
            levs.append(lv)
            total += len(t)
            if total >= max_bytes:
                break
    t, lv = np.concatenate(toks).astype(np.int64), np.concatenate(levs).astype(np.int64)
    n = (len(t) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.stack([t[idx], lv[idx]], axis=1)


def batches(windows: np.ndarray, batch: int, device: torch.device):  # noqa: ANN201
    """Endless (tokens, levels, targets, target_levels) batches cycling over the windows."""
    i = 0
    while True:
        rows = [(i + j) % len(windows) for j in range(batch)]
        i += batch
        w = torch.from_numpy(windows[rows]).to(device)
        yield w[:, 0, :-1], w[:, 1, :-1], w[:, 0, 1:], w[:, 1, 1:]


def train_steps(model, opt, data, n: int, device, dtype: str) -> list[float]:  # noqa: ANN001
    """``n`` optimizer steps; returns the losses (reading each one synchronises)."""
    losses = []
    for _ in range(n):
        tokens, levels, targets, tlev = next(data)
        with amp(device, dtype):
            out = model(tokens, levels, targets, tlev)
        out.loss.backward()
        clip_gradients(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return losses


# ---------------------------------------------------------------------------------------- sections
def section_attention(device: torch.device, smoke: bool) -> None:
    L, H, D, w = (256, 2, 16, 32) if smoke else (8192, 8, 64, 512)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, L, H, D, generator=g).to(device, torch.bfloat16) for _ in range(3))
    ref = attention(q.double(), k.double(), v.double(), w, backend="sdpa")
    for name in ("sdpa", "flex", "flash") if device.type == "cuda" else ("sdpa", "flex"):
        try:
            out = attention(q, k, v, w, backend=name)
            err = (out.double() - ref).abs().max().item()
            emit("attention", f"{name} bf16 vs fp64 SDPA, L={L} w={w}", f"max abs err {err:.2e}")
        except Exception as e:  # flash-attn absent, Flex missing: say so and go on
            emit("attention", f"{name} bf16, L={L} w={w}", f"unavailable: {str(e)[:80]}")
    cfg = AUNetConfig(
        dimensions=[64, 128],
        layers=[1, 2],
        head_dims=[32, 32],
        sliding_windows=[32, 64],
        max_seqlens=[L, L // 4],
        multiple_of=64,
    )
    L = 256 if smoke else 2048  # the model check: a shorter sequence, fewer kernels to compile
    cfg = cfg.replace(max_seqlens=[L, L // 4])
    torch.manual_seed(0)
    model = AUNet(cfg).to(device)
    data = batches(quickstart_windows(cfg.split_strategy, L, 4 * L * 8), 2, device)
    tokens, levels, _, _ = next(data)
    with torch.no_grad(), amp(device, "bfloat16"):
        model.set_attention("sdpa", device)
        a = model(tokens, levels).float()
        model.set_attention("flex", device)
        b = model(tokens, levels).float()
    err = (a - b).abs().max().item()
    emit("attention", "AU-Net logits flex vs sdpa (bf16)", f"max abs diff {err:.2e}")


def section_bf16(device: torch.device, smoke: bool, steps: int, budget_s: float) -> None:
    if elapsed() > budget_s:
        emit("bf16 vs fp32", "section", f"skipped: time budget {budget_s:.0f}s spent")
        return
    L, B = (256, 4) if smoke else (2048, 16)
    cfg = AUNetConfig(
        dimensions=[64, 128] if smoke else [256, 512],
        layers=[1, 2] if smoke else [2, 4],
        head_dims=[32, 32] if smoke else [64, 64],
        sliding_windows=[64, 128] if smoke else [512, 2048],
        max_seqlens=[L, L // 4],
        multiple_of=64,
    )
    windows = quickstart_windows(cfg.split_strategy, L, L * B * (steps + 1))
    final = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = AUNet(cfg).to(device)
        model.set_attention("auto", device, getattr(torch, dtype))
        opt = build_optimizer(model, 3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
        t = time.perf_counter()
        losses = train_steps(model, opt, batches(windows, B, device), steps, device, dtype)
        final[dtype] = float(np.mean(losses[-5:]))
        emit(
            "bf16 vs fp32",
            f"{dtype}: mean loss of steps {steps - 4}-{steps} ({model.attn_backend})",
            f"{final[dtype]:.4f} nats ({losses[0]:.3f} at step 1, {time.perf_counter() - t:.1f}s)",
        )
    rel = abs(final["bfloat16"] - final["float32"]) / final["float32"]
    emit("bf16 vs fp32", "relative difference", f"{rel:.2%}")


def pooled_capacity(windows: np.ndarray, multiple: int) -> int:
    """The pooled stage's capacity for these windows: the most real pooled positions any window
    has (its boundaries plus position 0), rounded up to ``multiple``; every bench batch is drawn
    from these windows, so nothing is truncated and the padding is under ``multiple`` per row."""
    real = int(((windows[:, 1, :-1] > 0).sum(1) + 1).max())
    return min(-(-real // multiple) * multiple, windows.shape[-1] - 1)


def paper_configs(
    smoke: bool, cap: int | None = None
) -> list[tuple[str, AUNetConfig, AUNetConfig, int]]:
    """(label, AU-Net 2, byte Transformer of the same FLOPs/byte, seq_len): the paper's windows
    (512 bytes, 4096 deep) and the official 2B_1level shape, at ~100M and ~1B parameters.
    ``cap``: the pooled capacity (default the official 3200 of 8192; the bench passes the one its
    data needs, ``pooled_capacity``, so the pooled stage computes little padding)."""
    if smoke:
        sizes = [("tiny", [32, 64], [1, 2], [16, 32], 256)]
        wins, cap = [32, 64], cap or 64
    else:
        sizes = [("~100M", [256, 768], [3, 12], [64, 64], 8192)]
        sizes.append(("~1B", [512, 1792], [3, 25], [64, 128], 8192))
        wins, cap = [512, 4096], cap or 3200
    out = []
    for label, dims, layers, hds, T in sizes:
        au = AUNetConfig(
            dimensions=dims,
            layers=layers,
            head_dims=hds,
            sliding_windows=wins,
            max_seqlens=[T, cap],
            rope_theta=500000.0,
            strategy={"word1": "1@1"},
            multiple_of=64 if smoke else 256,
        )
        byte_tpl = AUNetConfig(
            dimensions=[dims[-1]],
            layers=[layers[-1]],
            head_dims=[hds[-1]],
            sliding_windows=[wins[-1]],
            rope_theta=500000.0,
            strategy={},
            multiple_of=64 if smoke else 256,
        )
        byte = size_for_flops_per_byte(byte_tpl, flops_per_byte(au, T), T)
        out.append((label, au, byte, T))
    return out


def pick_batch(
    cfg: AUNetConfig, T: int, device: torch.device, smoke: bool, compiled: bool = False
) -> int:
    """Largest batch in 1..64 whose bf16 training memory estimate fits the device: the eager
    estimate within 60% (the eager steps keep every saved tensor), or with ``compiled`` the
    compiled estimate within 70% (measured peaks ran at 0.85-0.95x the estimates). Larger batches
    raise MFU: the optimizer step and the CPU's launch gaps are paid once per step."""
    if smoke:
        return 4 if compiled else 2
    total = torch.cuda.get_device_properties(device).total_memory
    share = 0.7 if compiled else 0.6
    best = 1
    for b in (1, 2, 4, 8, 16, 32, 64):
        if training_memory(cfg, T, b, "bfloat16", compiled=compiled).total < share * total:
            best = b
    return best


def useful_flops_per_s(cfg: AUNetConfig, T: int, B: int, real: float, step_s: float) -> float:
    """FLOP/s of a step counting only the real pooled positions (``real`` per window on average):
    what the model needed, so a stage's padding to capacity never raises the figure."""
    return flops_per_byte(cfg, T, [real] if cfg.num_stages else None) * B * T / step_s


def timed(model, opt, data, device, warm: int, n: int) -> float:  # noqa: ANN001
    train_steps(model, opt, data, warm, device, "bfloat16")
    sync(device)
    t = time.perf_counter()
    train_steps(model, opt, data, n, device, "bfloat16")
    sync(device)
    return (time.perf_counter() - t) / n


def section_throughput(
    device: torch.device, smoke: bool, budget_s: float, peak: float | None
) -> None:
    peak = peak or peak_flops(device)
    emit("throughput", "device bf16 peak", f"{peak:.3g} FLOP/s" if peak else "unknown (no MFU)")
    backend = "eager" if smoke else "inductor"  # smoke: the compile path, not its codegen
    warm, n = (1, 2) if smoke else (3, 5)
    mfu: dict[tuple[str, str], float] = {}
    _, au0, _, T = paper_configs(smoke)[0]  # every size: the same splitter and sequence length
    windows = quickstart_windows(au0.split_strategy, T, T * 40)  # all batches below come from these
    cap = pooled_capacity(windows, 32 if smoke else 128)
    real = float(((windows[:, 1, :-1] > 0).sum(1) + 1).mean())  # + BOS/pos 0
    emit("throughput", "pooled capacity from the data", f"{cap} (mean real {real:.0f} of T={T})")
    for label, au, byte, T in paper_configs(smoke, cap):
        for kind, cfg in (("AU-Net 2", au), ("byte Transformer", byte)):
            name = f"{kind} {label} ({num_params(cfg) / 1e6:.0f}M params, T={T})"
            if elapsed() > budget_s:
                emit("throughput", name, f"skipped: time budget {budget_s:.0f}s spent")
                continue
            try:
                B = pick_batch(cfg, T, device, smoke)
                gc.collect()
                reset_peak(device)
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0.0
                torch.manual_seed(0)
                model = AUNet(cfg).to(device)
                chosen = model.set_attention("auto", device, torch.bfloat16)
                opt = build_optimizer(model, 1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
                data = batches(windows, B, device)
                reset_peak(device)  # eager phase: its own peak (autograd keeps every saved tensor)
                eager_s = timed(model, opt, data, device, 1, 2 if smoke else 3)
                eager_peak = peak_bytes(device) - base  # earlier models' leftovers excluded
                shard(model, False, compile=True, compile_backend=backend)
                reset_peak(device)  # compiled phase: the partitioner keeps fewer tensors
                t_c = time.perf_counter()
                train_steps(model, opt, data, 1, device, "bfloat16")
                sync(device)
                compile_s = time.perf_counter() - t_c
                step_s = timed(model, opt, data, device, warm - 1, n)
                flops = flops_per_byte(cfg, T) * B * T / step_s  # as computed, padding included
                useful = useful_flops_per_s(cfg, T, B, real, step_s)
                est_e = training_memory(cfg, T, B, "bfloat16").total
                est_c = training_memory(cfg, T, B, "bfloat16", compiled=True).total
                meas = peak_bytes(device) - base  # what earlier models left is not this one's
                row = (
                    f"batch {B}, attention {chosen}, step {step_s * 1e3:.0f} ms "
                    f"(eager {eager_s * 1e3:.0f} ms: compile x{eager_s / step_s:.2f}, "
                    f"first compiled step {compile_s:.0f}s), {B * T / step_s / 1e6:.3f} MB/s, "
                    f"{useful / 1e12:.1f} useful TFLOP/s"
                )
                if peak:
                    mfu[(label, kind)] = useful / peak
                    row += f", MFU {useful / peak:.1%}"
                    if cfg.num_stages:
                        row += f" ({flops / peak:.1%} with padding: {real:.0f}/{cap} pooled)"
                mem = "peak mem" if device.type == "cuda" else "process peak RSS (no reset on CPU)"
                row += f", {mem} eager {eager_peak / 2**30:.2f} GiB vs est {est_e / 2**30:.2f}"
                row += f" GiB ({eager_peak / est_e:.2f}x), compiled {meas / 2**30:.2f} GiB vs est"
                row += f" {est_c / 2**30:.2f} GiB ({meas / est_c:.2f}x)"
                emit("throughput", name, row)
                Bc = pick_batch(cfg, T, device, smoke, compiled=True)
                if Bc > B and elapsed() < budget_s:  # compiled steps only: eager would not fit
                    reset_peak(device)
                    step_s = timed(model, opt, batches(windows, Bc, device), device, warm, n)
                    meas = peak_bytes(device) - base
                    est_c = training_memory(cfg, T, Bc, "bfloat16", compiled=True).total
                    useful = useful_flops_per_s(cfg, T, Bc, real, step_s)
                    row = (
                        f"batch {Bc} (the largest whose compiled estimate fits 70%), compiled "
                        f"step {step_s * 1e3:.0f} ms, {Bc * T / step_s / 1e6:.3f} MB/s, "
                        f"{useful / 1e12:.1f} useful TFLOP/s"
                    )
                    if peak:
                        mfu[(label, kind)] = useful / peak
                        row += f", MFU {useful / peak:.1%}"
                    row += f", {mem} {meas / 2**30:.2f} GiB vs est {est_c / 2**30:.2f} GiB"
                    row += f" ({meas / est_c:.2f}x)"
                    emit("throughput", f"{name}, batch {Bc}", row)
                del model, opt
            except Exception as e:
                emit("throughput", name, f"FAILED {type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        a, b = mfu.get((label, "AU-Net 2")), mfu.get((label, "byte Transformer"))
        if a and b:
            emit("throughput", f"MFU ratio AU-Net 2 / byte Transformer {label}", f"{a / b:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (about a minute)")
    ap.add_argument("--steps", type=int, default=None, help="bf16 vs fp32 steps (default 50)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no model after this")
    ap.add_argument("--peak-flops", type=float, default=None, help="bf16 peak; default: table")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="also write performance.md here")
    ap.add_argument(
        "--sections",
        nargs="*",
        default=["attention", "throughput", "bf16"],
        help="which sections to run, in this order (default: all three)",
    )
    args = ap.parse_args(argv)
    smoke = args.smoke
    global OUT
    if args.out:
        OUT = Path(args.out)
        OUT.mkdir(parents=True, exist_ok=True)
    if not smoke and not torch.cuda.is_available():
        print("bench: no CUDA device; use --smoke for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    for key in ("recompile_limit", "cache_size_limit"):  # one entry per stage shape and model
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    emit("env", "device", f"{dev}; torch {torch.__version__}")
    steps = args.steps or (6 if smoke else 50)
    sections = (
        ("attention", lambda: section_attention(device, smoke)),
        ("throughput", lambda: section_throughput(device, smoke, args.budget_s, args.peak_flops)),
        ("bf16", lambda: section_bf16(device, smoke, steps, args.budget_s + 60)),
    )
    for name, fn in [(n, f) for n, f in sections if n in args.sections]:
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:
            emit(name, "section", f"FAILED {type(e).__name__}: {str(e)[:200]}")
            traceback.print_exc()
        print(f"# {name}: {time.perf_counter() - t:.1f}s (total {elapsed():.1f}s)", flush=True)
    print("\n" + table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
