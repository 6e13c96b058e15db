"""INT8 vs fp32 on the quickstart-size AU-Net: weight size, generation speed, validation bpb.

    python tests/benchmarks/serve_int8.py [--checkpoint DIR] [--steps 120] [--threads 2]

Without ``--checkpoint`` the quickstart model (experiments/quickstart.yaml, variant aunet2) is
trained here for ``--steps`` steps on the quickstart corpus (batch 8 x 256 bytes, AdamW), so
that bits per byte mean something; with it, that checkpoint is used. Both models are then
measured in the same run:

- weight size: bytes of the serialized state dict (int8 packs linear weights with their scales);
- bytes/s: cached generation of ``--new-bytes`` per row, batch 1 and 8, seeded sampling;
- val bits/byte: ``aunet.evaluation.score_texts`` over the first ``--val-kb`` KB of the
  quickstart validation documents.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import io
import json
import random
import time
from pathlib import Path

import torch

from aunet.api import AUModel, quantize_int8
from aunet.config import AUNetConfig
from aunet.evaluation import aggregate, encode_with_levels, score_texts, splitter_for
from aunet.generate import generate
from aunet.loss import bits_per_byte
from aunet.model import AUNet

DATA = Path(__file__).resolve().parents[2] / "experiments" / "data"
QUICKSTART = dict(  # experiments/quickstart.yaml, model section
    dimensions=[64, 128],
    layers=[1, 3],
    head_dims=[32, 32],
    max_seqlens=[512, 128],
    sliding_windows=[128, 128],
    upsampling="multilinear",
    strategy={"word1": "1@1"},
)


def docs(name: str, limit: int) -> list[bytes]:
    out, total = [], 0
    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)["text"].encode()
            out.append(d)
            total += len(d)
            if total >= limit:
                break
    return out


def train(model: AUNet, steps: int, seq: int = 256, batch: int = 8) -> float:
    """A short AdamW run on the quickstart training text -> last loss (nats)."""
    text = b"\n".join(docs("quickstart.jsonl.gz", 4 << 20))
    sp = splitter_for(model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.1)
    rng = random.Random(0)
    model.train()
    loss = float("nan")
    for step in range(steps):
        toks, lvls = [], []
        for _ in range(batch):
            i = rng.randrange(len(text) - seq)
            t, lv = encode_with_levels(text[i : i + seq], sp, model.config.num_stages)
            toks.append(t)
            lvls.append(lv)
        x, lv = torch.tensor(toks), torch.tensor(lvls)
        out = model(x[:, :-1], lv[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
        for g in opt.param_groups:
            g["lr"] = 4e-3 * min(1.0, (step + 1) / 10) * (1 - 0.9 * step / steps)
        opt.step()
        loss = float(out.loss.detach())
    return loss


def state_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def speed(model: AUNet, prompts: list[bytes], new: int) -> float:
    start = time.perf_counter()
    outs = generate(model, prompts, new, temperature=1.0, top_k=40, seed=0)
    return sum(map(len, outs)) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-bytes", type=int, default=256)
    ap.add_argument("--val-kb", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        fp32 = AUModel.from_pretrained(args.checkpoint).model
        print(f"checkpoint {args.checkpoint}")
    else:
        torch.manual_seed(0)
        fp32 = AUNet(AUNetConfig(**QUICKSTART))
        t = time.perf_counter()
        loss = train(fp32, args.steps)
        print(
            f"trained here: {args.steps} steps, last loss {bits_per_byte(loss):.3f} bits/byte, "
            f"{time.perf_counter() - t:.0f} s"
        )
    fp32.eval()
    int8 = quantize_int8(copy.deepcopy(fp32))
    val = docs("quickstart_val.jsonl.gz", args.val_kb << 10)
    prompts = [d[:64] for d in val[:8]]
    rows = [("fp32", fp32), ("int8", int8)]
    res = {}
    for name, m in rows:
        s = aggregate(score_texts(m, val, context=512))
        res[name] = (
            state_bytes(m),
            speed(m, prompts[:1], args.new_bytes),
            speed(m, prompts, args.new_bytes),
            s.bits_per_byte,
        )
    print(f"{'model':6} {'weights KB':>10} {'B/s b=1':>9} {'B/s b=8':>9} {'val bpb':>8}")
    for name, (size, s1, s8, bpb) in res.items():
        print(f"{name:6} {size / 1024:10.1f} {s1:9.0f} {s8:9.0f} {bpb:8.4f}")
    f, q = res["fp32"], res["int8"]
    print(
        f"int8/fp32: weight size {q[0] / f[0]:.3f}x, bytes/s {q[1] / f[1]:.2f}x (batch 1) "
        f"{q[2] / f[2]:.2f}x (batch 8), val bpb delta {q[3] - f[3]:+.4f}"
    )


if __name__ == "__main__":
    main()
