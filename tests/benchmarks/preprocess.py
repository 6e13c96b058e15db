"""Preprocessing throughput: the Ray pipeline on 1 and 2 CPUs vs a single-process Python loop.

    python tests/benchmarks/preprocess.py [--mb 100] [--unit-mb 4] [--seq-len 8192] [--repeat 3]

The corpus is experiments/data/*.jsonl.gz (or /usr/share/common-licenses text files when absent),
copied into enough plain .jsonl files to reach --mb MB of text, cut into work units of --unit-mb.
Each Ray run is a fresh process (``ray.init(num_cpus=k)``), warmed by one small pipeline of 2k
units, which starts the k worker processes, so that the timing is the steady-state pipeline, not
Ray's start-up (the warm-up time is printed too). The loop does the same work in one process:
read -> Splitter -> BOS/EOS -> pack -> the pipeline's shard writer (windows,
Parquet, split-point statistics). The driver's share is its CPU time over all the machine's busy
CPU time during the run: the tasks do every per-byte step, so it says how many CPUs one driver
could feed (2% -> 50). Input checksums (once per corpus and machine, then cached) are excluded
from both sides. "tasks running" is the unit tasks' summed wall time over the run's: on a
machine shared with other work, it shows the parallelism even when the cores are not ours.
Every setting is timed ``--repeat`` times and its fastest run is kept (every time is printed): on a
shared VM a single 3-5 s run varies by ~10%.
Targets: 2 CPUs >= 1.8x one CPU; the pipeline on one CPU >= 0.8x the loop; driver share < 2%.
"One CPU" is one core for the whole run (pinned); the unpinned ``num_cpus=1`` figure is printed too.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(1, str(REPO))  # after the stdlib: never shadow it with a repo package

STRATEGY = {"word1": "1@1", "word2": "2@1"}


def make_corpus(out: Path, mb: float) -> tuple[list[Path], int, str]:
    src = sorted(glob.glob(str(REPO / "experiments/data/*.jsonl.gz")))
    if src:
        texts = []
        for f in src:
            with gzip.open(f, "rt") as g:
                texts += [json.loads(line)["text"] for line in g]
        origin = "experiments/data/*.jsonl.gz"
    else:
        files = sorted(glob.glob("/usr/share/common-licenses/*"))
        texts = [Path(f).read_text(errors="replace") for f in files if os.path.isfile(f)]
        origin = "/usr/share/common-licenses (experiments/data absent)"
    one = sum(len(t.encode()) for t in texts)
    copies = max(2, -(-int(mb * 1e6) // one))
    paths = []
    for c in range(copies):  # distinct ids per copy: a realistic corpus has no duplicate ids
        p = out / f"part-{c:03d}.jsonl"
        with open(p, "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": f"{c}-{i}", "text": t}) + "\n")
        paths.append(p)
    return paths, one * copies, origin


UNIT_BYTES = int(os.environ.get("BENCH_UNIT_BYTES", 2 << 20))  # set by main for its children


def spec_for(corpus: Path, out: Path, seq_len: int):
    from pipelines.spec import ExperimentSpec

    raw = {
        "name": "bench",
        "data": {
            "sources": [{"path": str(corpus / "*.jsonl"), "id_field": "id"}],
            "unit_bytes": UNIT_BYTES,
            "seq_len": seq_len,
            "val_fraction": 0.01,
            "dataset_dir": str(out),
        },
        "model": {
            "dimensions": [8, 16, 32],
            "layers": [1, 1, 1],
            "head_dims": [8, 8, 8],
            "strategy": STRATEGY,
        },
        "train": {"steps": 1},
        "tracking": {},
        "resources": {"storage_path": str(out.parent)},
    }
    return ExperimentSpec.from_dict(raw, source="benchmark")


def _busy_cpu_seconds() -> float:
    """CPU time (user + system) of this process and every process it started (raylet, GCS, the
    workers), from /proc: other users of a shared machine do not count, exited children do."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    tree, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += [p for p, (ppid, _) in stats.items() if ppid == pid and p not in tree]
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


def child(cpus: int, corpus: Path, out: Path, seq_len: int, pin: bool, repeat: int) -> None:
    """In a fresh process: ray.init(num_cpus), a warm-up pipeline of ``cpus`` units, then
    ``repeat`` timed runs; prints the fastest (with every run's time).

    ``pin``: the whole run (this driver and every Ray process it starts, which inherit the
    affinity) is confined to ``cpus`` cores, so "1 CPU" is one core for everything; unpinned,
    ``num_cpus=1`` only limits Ray's task slots while the driver and Ray's own daemons use the
    other core.
    """
    import ray

    from pipelines.preprocess import preprocess

    if pin:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    warm_src = Path(f"{out}-warm-src")
    warm_src.mkdir()
    first = sorted(corpus.glob("*.jsonl"))[0]
    with open(first) as f:
        lines = [f.readline() for _ in range(4)]
    for k in range(2 * cpus):  # units for every CPU slot: worker processes start before the timing
        with open(warm_src / f"w{k}.jsonl", "w") as g:
            g.writelines(lines * 200)
    t = time.perf_counter()
    preprocess(spec_for(warm_src, Path(f"{out}-warm"), seq_len), force=True)
    warm = time.perf_counter() - t
    # Input checksums are computed once per corpus and machine (cached by size and mtime): hash
    # them here so every timed run is the steady state (the loop excludes them too).
    from pipelines.corpus import resolve_inputs

    resolve_inputs(spec_for(corpus, out, seq_len).data.sources)
    runs = []
    for _ in range(repeat):
        busy, c, t = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        info = preprocess(spec_for(corpus, out, seq_len), force=True)
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        runs.append(
            {
                "seconds": dt,
                "warmup_seconds": warm,
                "driver_cpu": cpu,
                "busy_cpu": _busy_cpu_seconds() - busy,
                "bytes": info.manifest["bytes"],
                "task_seconds": info.manifest["units"]["task_seconds"],
                "pipeline_seconds": info.manifest["seconds"],
            }
        )
    print("RESULT", json.dumps(_best(runs)))


def _best(runs: list[dict]) -> dict:
    """The fastest of repeated runs, with every run's time under ``all_seconds``."""
    return {**min(runs, key=lambda r: r["seconds"]), "all_seconds": [r["seconds"] for r in runs]}


def run_ray(
    cpus: int, corpus: Path, out: Path, seq_len: int, pin: bool, repeat: int
) -> dict[str, float]:
    args = [str(cpus), str(corpus), str(out), str(seq_len), str(int(pin)), str(repeat)]
    cmd = [sys.executable, __file__, "--child", *args]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not line:
        raise RuntimeError(f"ray run with {cpus} CPUs failed:\n{res.stderr[-3000:]}")
    return json.loads(line[0][7:])


def run_loop(corpus: Path, out: Path, seq_len: int) -> dict[str, float]:
    """The same work in one Python process, no Ray: read -> Splitter (``levels_batch`` per file)
    -> BOS/EOS -> pack, and each shard through the pipeline's own shard writer (windows, Parquet,
    the split-point statistics of the manifest). Input checksums are excluded, as in the timed Ray
    runs."""
    import numpy as np
    import pyarrow.fs as pafs

    from aunet.packing import Packer, encode_document, windows
    from aunet.splitting import Splitter
    from pipelines.corpus import hash01, records, to_bytes
    from pipelines.data import write_shard

    t = time.perf_counter()
    out.mkdir(parents=True)
    splitter, K = Splitter(STRATEGY), len(STRATEGY)
    packers = [Packer(seq_len, chunk=1024), Packer(seq_len, chunk=1024)]
    nbytes = shards = 0

    fs = pafs.LocalFileSystem()

    def write(chunk) -> None:
        nonlocal shards
        tw, lw = windows(*chunk, seq_len)
        write_shard(fs, str(out / f"shard-{shards:05d}.parquet"), tw, lw, 0)
        inputs = lw[:, :-1]  # the manifest's split-point statistics, as the tasks compute them
        for s in range(1, K + 1):
            per_seq = (inputs >= s).sum(1)
            int(per_seq.sum()), int(per_seq.max(initial=0))
        shards += 1

    files = sorted(corpus.glob("*.jsonl"))
    for f in files:
        docs = []  # a file's documents split in one levels_batch call, as the pipeline does
        for _, value, ident, _ in records(str(f), "jsonl", "text", "id", None):
            data, reason = to_bytes(value)
            if data is None:
                continue
            split = int(hash01(b"0", b"split", b"id:" + str(ident).encode()) < 0.01)
            docs.append((split, data))
        lengths = [len(data) for _, data in docs]
        levels = splitter.levels_batch(b"".join(data for _, data in docs), np.array(lengths))
        at = 0
        for (split, data), n in zip(docs, lengths):
            nbytes += n
            tok, lev = encode_document(data, levels[at : at + n], K)
            at += n
            for chunk in packers[split].add(tok, lev):
                write(chunk)
    for p in packers:
        last, _ = p.finish()
        if last is not None:
            write(last)
    return {"seconds": time.perf_counter() - t, "bytes": nbytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per setting; best is kept")
    ap.add_argument("--unit-mb", type=float, default=4.0, help="data.unit_bytes in MB")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.child:
        os.environ["BENCH_UNIT_BYTES"] = str(int(args.unit_mb * (1 << 20)))
    if args.child:
        cpus, corpus, out, seq_len, pin, repeat = args.child
        return child(int(cpus), Path(corpus), Path(out), int(seq_len), pin == "1", int(repeat))
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        sys.exit(f"preprocess benchmark: needs 2 cores, this process may use {cores}")
    with tempfile.TemporaryDirectory(prefix="aunet-bench-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        paths, nbytes, origin = make_corpus(corpus, args.mb)
        print(f"corpus: {origin}, {len(paths)} files, {nbytes / 1e6:.1f} MB of text")
        loops = [run_loop(corpus, tmp / f"loop{i}", args.seq_len) for i in range(args.repeat)]
        r, T = args.repeat, args.seq_len
        runs = {
            "loop": _best(loops),
            "ray-1cpu": run_ray(1, corpus, tmp / "ray1", T, pin=True, repeat=r),
            "ray-2cpu": run_ray(2, corpus, tmp / "ray2", T, pin=True, repeat=r),
            "ray-1slot": run_ray(1, corpus, tmp / "ray1u", T, pin=False, repeat=r),
        }
    mbps = {k: v["bytes"] / 1e6 / v["seconds"] for k, v in runs.items()}
    print(f"best of {args.repeat} timed runs per setting")
    notes = {
        "loop": "one process",
        "ray-1cpu": "num_cpus=1, all processes pinned to 1 core",
        "ray-2cpu": "num_cpus=2, 2 cores",
        "ray-1slot": "num_cpus=1, unpinned: driver and Ray daemons on the other core",
    }
    for k, v in mbps.items():
        r = runs[k]
        extra = ""
        if k != "loop":
            used = r["busy_cpu"] / r["seconds"]
            running = r["task_seconds"] / r["pipeline_seconds"]
            extra = (
                f"  wall {r['seconds']:.2f} s, tasks running {running:.2f}"
                f" on average, cores busy {used:.2f}, driver CPU "
                f"{r['driver_cpu']:.2f} s, warm-up {r['warmup_seconds']:.1f} s (excluded)"
            )
        every = "/".join(f"{x:.2f}" for x in r["all_seconds"])
        print(f"{k:9s} {v:7.2f} MB/s  ({notes[k]}){extra}\n{'':19s}runs: {every} s")
    for k in ("ray-1cpu", "ray-2cpu"):
        share = runs[k]["driver_cpu"] / runs[k]["busy_cpu"]
        print(f"driver share of CPU, {k}: {100 * share:.2f}% (target < 2%)")
    print(f"2 CPUs / 1 CPU: {mbps['ray-2cpu'] / mbps['ray-1cpu']:.2f}x (target >= 1.8)")
    print(f"1 CPU / loop:   {mbps['ray-1cpu'] / mbps['loop']:.2f}x (target >= 0.8)")
    print(f"2 CPUs / 1 unpinned slot: {mbps['ray-2cpu'] / mbps['ray-1slot']:.2f}x")


if __name__ == "__main__":
    main()
