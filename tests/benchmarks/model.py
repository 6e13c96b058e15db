"""Training-step throughput of AU-Net vs a byte Transformer of equal FLOPs/byte (CPU).

    python tests/benchmarks/model.py [--threads 2] [--seq-len 2048] [--steps 5]

For a 2-stage (K=1) and a 3-stage (K=2) AU-Net, a 1-stage baseline is sized by depth to the same
``flops_per_byte`` (``aunet.flops.size_for_flops_per_byte``). Each model runs forward + backward
on word-split English-like bytes at batch 1 with 2 threads (the box has 2 cores), alternating the
two models step by step and keeping each one's fastest step, because the box is shared. Achieved
FLOP/s uses our count (causal attention pairs, at the stage lengths the batch actually ran);
"executed" also counts the masked-out scores that SDPA computes for windowed stages. The target is
an AU-Net / baseline ratio of achieved FLOP/s >= 0.8: the hierarchy (gathers, 16 small
multi-linear matmuls, short deep sequences) should not waste the hardware.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from aunet.config import AUNetConfig
from aunet.flops import attention_pairs, flops_per_byte, num_params, size_for_flops_per_byte
from aunet.model import AUNet
from aunet.splitting import Splitter

WORDS = ["the", "of", "and", "a", "to", "in", "is", "was", "that", "for", "it", "with", "Hello"]

AUNETS = {
    "aunet-2stage": AUNetConfig(
        dimensions=[128, 512],
        layers=[2, 6],
        head_dims=[32, 64],
        sliding_windows=[256, None],
    ),
    "aunet-3stage": AUNetConfig(
        dimensions=[128, 384, 640],
        layers=[2, 2, 6],
        head_dims=[32, 64, 64],
        sliding_windows=[256, None, None],
    ),
}
BASELINE = AUNetConfig(dimensions=[256], layers=[8], head_dims=[64], sliding_windows=[None])


def text_bytes(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    parts: list[str] = []
    while sum(map(len, parts)) < n:
        parts.append(rng.choice(WORDS) + rng.choice([" "] * 8 + [", ", ". ", "\n"]))
    return "".join(parts).encode()[:n]


def batch(config: AUNetConfig, T: int, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, levels (B, T) int64 from the config's real splitter."""
    rows = [text_bytes(T, s) for s in range(B)]
    tokens = torch.tensor([list(r) for r in rows])
    if config.num_stages == 0:
        return tokens, torch.zeros_like(tokens)
    sp = Splitter(config.split_strategy)
    return tokens, torch.stack([torch.from_numpy(sp.levels(r).astype("int64")) for r in rows])


def executed_flops_per_byte(config: AUNetConfig, T: int, lengths: list[int]) -> float:
    """FLOPs/byte the CPU kernels execute: SDPA with an explicit (window) mask computes all L^2
    scores, so windowed stages count dense; full-causal stages (is_causal) count causal pairs."""
    extra = 0.0
    L = [T, *lengths]
    for s, st in enumerate(config.stages):
        if st.sliding_window is not None and st.sliding_window < L[s]:
            n = st.layers if st.is_trunk else 2 * st.layers
            extra += 12 * n * st.dim * (L[s] ** 2 - attention_pairs(L[s], st.sliding_window))
    return flops_per_byte(config, T, lengths) + extra / T


class Runner:
    """One model and its batch; ``step()`` times one forward + backward."""

    def __init__(self, config: AUNetConfig, T: int, B: int) -> None:
        torch.manual_seed(0)
        self.config, self.T, self.B = config, T, B
        self.model = AUNet(config)
        self.tokens, self.levels = batch(config, T, B)
        self.lengths = [p.length for p in self.model.plan(self.levels)]
        self.fpb = flops_per_byte(config, T, self.lengths)
        self.executed = executed_flops_per_byte(config, T, self.lengths)
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        self.model(self.tokens, self.levels, targets=self.tokens).loss.backward()
        self.model.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - t0)

    def summary(self) -> dict[str, float]:
        sec = min(self.times)  # the least-disturbed step: the box is shared
        return {
            "step_s": sec,
            "bytes_per_s": self.B * self.T / sec,
            "flop_per_s": self.fpb * self.B * self.T / sec,
            "executed_per_s": self.executed * self.B * self.T / sec,
        }


def compare(au: Runner, base: Runner, warmup: int, steps: int) -> None:
    """Alternate the two models step by step so that load changes on a shared box hit both."""
    for i in range(warmup + steps):
        au.step(i >= warmup)
        base.step(i >= warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    T, B = args.seq_len, args.batch
    print(
        f"torch {torch.__version__}, {args.threads} threads, T={T}, B={B}, fp32 CPU, "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    for name, cfg in AUNETS.items():
        au = Runner(cfg, T, B)
        # the baseline gets the AU-Net's FLOPs/byte at the stage lengths this batch runs
        base = Runner(size_for_flops_per_byte(BASELINE, au.fpb, T, scale="depth"), T, B)
        compare(au, base, args.warmup, args.steps)
        r_au, r_base = au.summary(), base.summary()
        for label, run, r in (
            (name, au, r_au),
            (f"baseline({base.config.layers[0]}L)", base, r_base),
        ):
            c = run.config
            print(
                f"{label:14s} dims={c.dimensions} layers={c.layers} lengths={run.lengths} "
                f"params={num_params(c) / 1e6:.2f}M FLOPs/byte={run.fpb / 1e6:.1f}M "
                f"step={r['step_s']:.3f}s bytes/s={r['bytes_per_s']:.0f} "
                f"GFLOP/s={r['flop_per_s'] / 1e9:.1f} (executed {r['executed_per_s'] / 1e9:.1f})"
            )
        ratio = r_au["flop_per_s"] / r_base["flop_per_s"]
        print(
            f"{name}: FLOPs/byte ratio {au.fpb / base.fpb:.3f}, "
            f"bytes/s ratio {r_au['bytes_per_s'] / r_base['bytes_per_s']:.3f}, "
            f"achieved FLOP/s ratio {ratio:.3f} ({'OK' if ratio >= 0.8 else 'BELOW'} target 0.8), "
            f"executed FLOP/s ratio {r_au['executed_per_s'] / r_base['executed_per_s']:.3f}"
        )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
