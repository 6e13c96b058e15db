"""Generation speed: cached AU-Net vs re-running the forward, and vs a byte-level Transformer.

    python tests/benchmarks/generate.py [--prompt-bytes 1024 --new-bytes 512 --threads 2]

Random-init models of a meaningful size (AU-Net 2: d = [256, 512]); the bytes fed after the prompt
are real text (teacher-forced), so stage 1 runs at a realistic rate (once per word) rather than at
whatever rate a random model's bytes would give. Sampling is excluded; the level computation
(each row's incremental LevelStream, aunet/splitstream.py) is included: part of every step.

- naive: one full forward over BOS + prompt + bytes so far per new byte. It is timed on the first
  ``--naive-steps`` bytes only (its cost grows with the prefix), so its bytes/s is an upper bound
  and the printed speed-up a lower bound.
- byte Transformer: one stage with the same parameter count (depth chosen to match), full
  attention and, separately, the AU-Net byte stage's window.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch

from aunet.config import BOS_ID, AUNetConfig
from aunet.generate import Generator
from aunet.model import AUNet

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]
CORPUS = Path(__file__).resolve().parents[2] / "experiments" / "data" / "quickstart_val.jsonl.gz"


def text_bytes(n: int) -> bytes:
    """n bytes of English prose (the quickstart validation set, else a fixed paragraph)."""
    data = b""
    if CORPUS.is_file():
        with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                if doc.get("lang", "en") == "en":
                    data += doc["text"].encode() + b"\n"
                if len(data) >= n:
                    break
    filler = b"The quick brown fox jumps over the lazy dog, and then it sleeps. "
    while len(data) < n:
        data += filler
    return data[:n]


def aunet2(window: int) -> AUNet:
    cfg = AUNetConfig(
        dimensions=[256, 512],
        layers=[3, 6],
        head_dims=[64, 64],
        sliding_windows=[window, None],
        upsampling="multilinear",
    )
    return AUNet(cfg).eval()


def byte_transformer(target_params: int, window: int | None) -> AUNet:
    """One stage, d = 512, depth chosen so the parameter count is closest to target_params."""

    def build(n: int) -> AUNet:
        return AUNet(
            AUNetConfig(dimensions=[512], layers=[n], head_dims=[64], sliding_windows=[window])
        )

    with torch.device("meta"):  # parameter counts only: no memory, no init
        one, two = build(1).num_params(), build(2).num_params()
    n = max(1, round((target_params - one) / (two - one)) + 1)
    return build(n).eval()


def cached_rate(model: AUNet, prompt: bytes, fed: bytes) -> tuple[float, float, float]:
    """(bytes/s of decode steps, prefill seconds, fraction of steps that reached stage 1)."""
    gen = Generator(model)
    t0 = clock()
    gen.prefill([prompt], len(fed))
    t1 = clock()
    for b in fed:
        gen.step([b])
    t2 = clock()
    deep = sum(lv > 0 for lv in gen.levels[0][len(prompt) + 1 :]) / len(fed)
    return len(fed) / (t2 - t1), t1 - t0, deep


@torch.inference_mode()
def naive_rate(model: AUNet, prompt: bytes, fed: bytes, steps: int) -> float:
    """bytes/s when every new byte re-runs the forward over the whole prefix."""
    gen = Generator(model)  # only for its level bookkeeping (the splitter on the prefix)
    gen.prefill([b""], 0)
    levels = [model.config.num_stages, *(gen.splitter.levels(prompt) if gen.splitter else [])]
    text = bytearray(prompt)
    t0 = clock()
    for b in fed[:steps]:
        tokens = torch.tensor([[BOS_ID, *text]])
        model(tokens, torch.tensor([[int(x) for x in levels]]))[0, -1]
        text.append(b)
        levels.append(int(gen.splitter.levels(bytes(text))[-1]) if gen.splitter else 0)
    return steps / (clock() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-bytes", type=int, default=1024)
    ap.add_argument("--new-bytes", type=int, default=512)
    ap.add_argument("--naive-steps", type=int, default=24)
    ap.add_argument("--window", type=int, default=512, help="AU-Net byte-stage window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    ap.add_argument(
        "--clock", choices=CLOCK, default="wall", help="cpu: process CPU time (on a shared box)"
    )
    args = ap.parse_args(argv)
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = text_bytes(args.prompt_bytes + args.new_bytes)
    prompt, fed = data[: args.prompt_bytes], data[args.prompt_bytes :]

    au = aunet2(args.window)
    bt_full = byte_transformer(au.num_params(), None)
    bt_win = byte_transformer(au.num_params(), args.window)
    print(
        f"prompt {len(prompt)} B, {len(fed)} new bytes, {args.threads} threads, {args.clock} clock"
    )
    print(f"AU-Net 2  d=[256,512] layers=[3,6]      {au.num_params() / 1e6:6.1f} M params")
    n = len(bt_full.trunk.layers)
    print(f"byte Transformer d=512 layers={n}       {bt_full.num_params() / 1e6:6.1f} M params")

    def best(fn):  # noqa: ANN001, ANN202
        runs = [fn() for _ in range(args.repeats)]
        return max(runs, key=lambda r: r[0] if isinstance(r, tuple) else r)

    au_rate, au_prefill, deep = best(lambda: cached_rate(au, prompt, fed))
    naive = best(lambda: naive_rate(au, prompt, fed, args.naive_steps))
    full_rate, full_prefill, _ = best(lambda: cached_rate(bt_full, prompt, fed))
    win_rate, win_prefill, _ = best(lambda: cached_rate(bt_win, prompt, fed))
    rows = [
        ("AU-Net 2, cached", au_rate, au_prefill),
        (f"AU-Net 2, naive re-run (first {args.naive_steps} bytes)", naive, float("nan")),
        ("byte Transformer, cached, full attention", full_rate, full_prefill),
        (f"byte Transformer, cached, window {args.window}", win_rate, win_prefill),
    ]
    print(f"stage 1 ran on {deep:.1%} of the decode steps")
    print(f"{'generator':52s} {'bytes/s':>9s} {'prefill s':>10s}")
    for name, rate, pre in rows:
        print(f"{name:52s} {rate:9.1f} {pre:10.3f}")
    print(f"cached / naive AU-Net:                 {au_rate / naive:6.1f}x (target >= 10x)")
    print(f"AU-Net 2 / byte Transformer (full):    {au_rate / full_rate:6.2f}x")
    print(f"AU-Net 2 / byte Transformer (window):  {au_rate / win_rate:6.2f}x")


if __name__ == "__main__":
    main()
