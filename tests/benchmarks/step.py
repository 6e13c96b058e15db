"""Milliseconds per ``Generator.step`` at serving sizes: the quickstart AU-Net and its byte
baseline of equal parameters (tests/benchmarks/serve.py), at batch 1 and 16, one thread.

    python tests/benchmarks/step.py [--steps 128 --repeat 5 --clock cpu --profile --width 1]

Every row is prefilled with 64 bytes of the quickstart validation text and then fed the text's
next bytes (teacher-forced, so the AU-Net's stage 1 runs at a real word rate, unlike the random
model's own samples). A row's text starts at a different offset per row, so rows advance stage 1
on different steps (the case where only some rows go deeper). Printed: the best of ``--repeat``
interleaved runs of the mean ms per step, in CPU time by default (on a shared box, wall time
also counts the waits for a core); ``--profile`` prints the cProfile top of one run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import text_bytes  # noqa: E402
from serve import models  # noqa: E402

from aunet.generate import Generator  # noqa: E402
from aunet.model import AUNet  # noqa: E402

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["cpu"]


def run(model: AUNet, batch: int, steps: int, text: bytes) -> float:
    """Mean seconds per step of one prefill-then-steps run."""
    rows = [text[997 * b : 997 * b + 64 + steps] for b in range(batch)]
    gen = Generator(model)
    gen.prefill([r[:64] for r in rows], steps)
    t = clock()
    for i in range(steps):
        gen.step([r[64 + i] for r in rows])
    return (clock() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--width", type=int, default=1, help="as tests/benchmarks/serve.py --width")
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    aunet, base = models(args.width)
    nets = {"aunet": aunet, "baseline": base}
    text = text_bytes(16 * 997 + 64 + args.steps)
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.repeat):
        for name, model in nets.items():
            for batch in (1, 16):
                s = run(model, batch, args.steps, text)
                best[name, batch] = min(best.get((name, batch), s), s)
    for (name, batch), s in best.items():
        print(f"{name:8} batch {batch:2}: {1000 * s:6.2f} ms/step  {batch / s:7.0f} bytes/s")
    for batch in (1, 16):
        ratio = best["baseline", batch] / best["aunet", batch]
        print(f"batch {batch:2}: AU-Net / baseline bytes/s {ratio:.2f}x")
    if args.profile:
        for batch in (1, 16):
            prof = cProfile.Profile()
            prof.enable()
            run(aunet, batch, args.steps, text)
            prof.disable()
            print(f"--- aunet batch {batch}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
