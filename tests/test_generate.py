"""Cached generation against a naive generator that re-runs the full forward on every prefix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aunet.api import AUModel
from aunet.checkpoint import CheckpointError, save_pretrained
from aunet.config import BOS_ID, EOS_ID, UPSAMPLINGS, AUNetConfig
from aunet.generate import Generator, generate, sample_next
from aunet.model import AUNet
from aunet.splitting import Splitter

# Prompts end mid-word, right after a boundary (space), mid-UTF-8 character; one is just BOS.
PROMPTS = [b"Hello there, my frie", b"In 1984, the quick brown fox jumps over ", b"caf\xc3", b""]
# Fed continuation: long words (offsets wrap mod 4), digits, whitespace before a newline (the
# prefix-unstable case of spec 2.8), double spaces, multi-byte characters, 4+ word chains.
CONT = (
    b"nd. It is 12345 and the lazy dog sleeps \n more  words\xc3\xa9 ok; "
    b"averyveryverylongword then; a b c d e f g h!\n"
)


def make_model(K: int, upsampling: str = "multilinear", seed: int = 0, **kw) -> AUNet:
    """Tiny model whose windows are all smaller than the prompts (sliding-window eviction)."""
    cfg = dict(
        dimensions=[16, 32, 64, 128][: K + 1],
        layers=[1] * (K + 1),
        head_dims=[8] * (K + 1),
        sliding_windows=[6, 4, 3, 2][: K + 1],
        multiple_of=16,
        upsampling=upsampling,
        upsampling_positions=4,
    )
    cfg.update(kw)
    torch.manual_seed(seed)
    return AUNet(AUNetConfig(**cfg)).eval()


def levels_fn(model: AUNet):
    K = model.config.num_stages
    sp = Splitter(model.config.split_strategy) if K else None
    return lambda data: [int(x) for x in sp.levels(bytes(data))] if sp else [0] * len(data)


def naive_levels(model: AUNet, prompt: bytes, fed: bytes) -> list[int]:
    """BOS at K, the prompt's levels from the whole prompt, each fed byte's from its prefix."""
    lv = levels_fn(model)
    return [model.config.num_stages, *lv(prompt)] + [
        lv(prompt + fed[: i + 1])[-1] for i in range(len(fed))
    ]


@torch.no_grad()
def naive_logits(model: AUNet, prompt: bytes, fed: bytes, rerun: bool = True) -> torch.Tensor:
    """Next-byte logits after BOS + prompt + fed[:i] for every i -> (len(fed) + 1, 258).

    rerun: one full forward per prefix (the naive generator). Otherwise one forward over the whole
    sequence: the same numbers, because levels are never revised and the forward is causal
    (tested in test_model), at a fraction of the cost.
    """
    levels = naive_levels(model, prompt, fed)
    tokens = [BOS_ID, *prompt, *fed]
    if not rerun:
        n = len(prompt) + 1
        return model(torch.tensor([tokens]), torch.tensor([levels]))[0, n - 1 :]
    return torch.stack(
        [
            model(torch.tensor([tokens[:n]]), torch.tensor([levels[:n]]))[0, -1]
            for n in range(len(prompt) + 1, len(tokens) + 1)
        ]
    )


@torch.no_grad()
def naive_greedy(model: AUNet, prompt: bytes, n: int) -> bytes:
    """Uncached greedy decoding (BOS never chosen, EOS stops)."""
    lv = levels_fn(model)
    text, levels = bytearray(prompt), [model.config.num_stages, *lv(prompt)]
    for _ in range(n):
        logits = model(torch.tensor([[BOS_ID, *text]]), torch.tensor([levels]))[0, -1]
        logits[BOS_ID] = -float("inf")
        t = int(logits.argmax())
        if t == EOS_ID:
            break
        text.append(t)
        levels.append(lv(text)[-1])
    return bytes(text[len(prompt) :])


pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [(0, "multilinear")] + [(K, u) for K in (1, 2, 3) for u in UPSAMPLINGS]


@pytest.mark.parametrize("K, upsampling", CASES)
def test_cached_logits_match_full_forward(K: int, upsampling: str) -> None:
    model = make_model(K, upsampling)
    feeds = [CONT, CONT[7:], CONT[:25], CONT[40:]]  # rows stop at different steps
    gen = Generator(model)
    logits = [[row] for row in gen.prefill(PROMPTS, max_new_bytes=1)]  # caches must grow
    for i in range(max(map(len, feeds))):
        rows = [b for b, f in enumerate(feeds) if i < len(f)]
        step = gen.step([feeds[b][i] for b in rows], rows)
        for j, b in enumerate(rows):
            logits[b].append(step[j])
    reached = set()
    for b, (prompt, fed) in enumerate(zip(PROMPTS, feeds)):
        levels = naive_levels(model, prompt, fed)
        assert gen.levels[b] == levels
        ref = naive_logits(model, prompt, fed, rerun=False)
        reached |= set(levels[len(prompt) + 1 :])
        torch.testing.assert_close(torch.stack(logits[b]), ref, atol=1e-4, rtol=0)
    assert reached == set(range(K + 1)), "every stage must advance during decoding"
    byte_caches = [gen.enc_caches[0], gen.dec_caches[0]] if K else [gen.trunk_cache]
    assert [c.size for c in byte_caches] == [model.config.windows[0]] * len(byte_caches)


@pytest.mark.parametrize("K", [1, 2])
def test_deep_window_rings_grow_from_the_prompt_then_wrap(K: int) -> None:
    """Deep stages' sliding-window rings start at the prompt's positions and grow as segments
    close (aunet/kvcache.py): logits equal the full forward while they grow, after they reach
    the window and once rows wrap."""
    model = make_model(K, sliding_windows=[6, 24, 16][: K + 1])
    feed = CONT + CONT  # ~50 words: every deep ring outgrows its window
    gen = Generator(model)
    logits = [gen.prefill(PROMPTS, max_new_bytes=1)]
    deep = [gen.enc_caches[s] for s in range(1, K)] + [gen.trunk_cache]
    start = [c.size for c in deep]
    assert all(size < w for size, w in zip(start, model.config.windows[1:]))
    for t in feed:
        logits.append(gen.step([t] * len(PROMPTS)))
    assert [c.size for c in deep] == list(model.config.windows[1:]), start
    assert int(gen.n[1].min()) > model.config.windows[1], "stage 1 must wrap its ring"
    for b, prompt in enumerate(PROMPTS):
        ref = naive_logits(model, prompt, feed, rerun=False)
        got = torch.stack([step[b] for step in logits])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "K, upsampling, kw",
    [
        (1, "multilinear", {}),
        (2, "repeat", {"residuals": [False, True]}),
        (2, "scatter", {"n_kv_heads": 1, "sliding_windows": None}),
        (3, "nonparam_multilinear", {}),
    ],
)
def test_greedy_bytes_and_logits_match_naive(K: int, upsampling: str, kw: dict) -> None:
    model = make_model(K, upsampling, seed=K, **kw)
    for prompt in PROMPTS[:2]:
        out = generate(model, prompt, 24, temperature=0.0)
        assert out == naive_greedy(model, prompt, 24)
        gen = Generator(model)
        cached = [gen.prefill([prompt], 24)[0]] + [gen.step([t])[0] for t in out]
        ref = naive_logits(model, prompt, out)
        torch.testing.assert_close(torch.stack(cached), ref, atol=1e-4, rtol=0)


def test_batch_equals_single_prompts() -> None:
    model = make_model(2, "multilinear", seed=3)
    batch = generate(model, PROMPTS, 30, temperature=0.0)
    assert batch == [generate(model, p, 30, temperature=0.0) for p in PROMPTS]
    assert generate(model, PROMPTS[:1], 5, temperature=0) == [batch[0][:5]]


def test_sampling_reproducible_with_seed() -> None:
    model = make_model(1, "repeat", seed=4)
    a = generate(model, PROMPTS[:2], 30, temperature=1.0, seed=7)
    assert a == generate(model, PROMPTS[:2], 30, temperature=1.0, seed=7)
    assert a != generate(model, PROMPTS[:2], 30, temperature=1.0, seed=8)
    greedy = generate(model, PROMPTS[0], 20, temperature=0.0)
    assert generate(model, PROMPTS[0], 20, top_k=1, seed=1) == greedy
    assert generate(model, PROMPTS[0], 20, top_p=1e-6, seed=1) == greedy


def test_top_k_top_p_support() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * 254)
    logits = probs.clamp_min(1e-30).log().expand(4000, -1)
    rng = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 2, None, rng).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, None, 0.8, rng).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, None, 0.81, rng).tolist()) == {0, 1, 2}
    freq = torch.bincount(sample_next(logits, 1.0, None, None, rng), minlength=258)[:4] / 4000
    torch.testing.assert_close(freq, probs[:4], atol=0.03, rtol=0)
    bos = torch.zeros(2, 258)
    bos[:, BOS_ID] = 10.0
    assert (sample_next(bos, 0.0, None, None, rng) != BOS_ID).all()


def test_ignore_eos_runs_to_the_byte_limit() -> None:
    """A model that prefers EOS everywhere: without ignore_eos it stops at once; with it, greedy
    equals the naive loop with EOS masked, and sampling fills max_new_bytes."""
    model = make_model(2, seed=5)
    model.vocab.register_forward_hook(
        lambda mod, inp, out: out + 100 * F.one_hot(torch.tensor(EOS_ID), out.shape[-1])
    )
    assert generate(model, PROMPTS[1], 20, temperature=0.0) == b""
    got = generate(model, PROMPTS[1], 20, temperature=0.0, ignore_eos=True)
    lv = levels_fn(model)
    text, levels = bytearray(PROMPTS[1]), [model.config.num_stages, *lv(PROMPTS[1])]
    with torch.no_grad():
        for _ in range(20):
            logits = model(torch.tensor([[BOS_ID, *text]]), torch.tensor([levels]))[0, -1]
            logits[[BOS_ID, EOS_ID]] = -float("inf")
            text.append(int(logits.argmax()))
            levels.append(lv(text)[-1])
    assert got == bytes(text[len(PROMPTS[1]) :])
    sampled = generate(model, PROMPTS[:2], 17, seed=1, ignore_eos=True)
    assert [len(x) for x in sampled] == [17, 17]


def test_stop_bytes_and_eos() -> None:
    model = make_model(2, "multilinear", seed=5)
    full = generate(model, PROMPTS[1], 40, temperature=0.0)
    stop = full[10:12]
    cut = generate(model, PROMPTS[1], 40, temperature=0.0, stop=stop)
    assert cut == full[: full.find(stop)]
    first = full[0]
    with torch.no_grad():  # make EOS beat the first greedy byte: its logit becomes 50x larger
        model.vocab.weight[EOS_ID] = 50 * model.vocab.weight[first]
    assert generate(model, [PROMPTS[1], PROMPTS[0]], 40, temperature=0.0)[0] == b""


@pytest.mark.parametrize("strategy", [{"pretok": "1"}, {"word1": "1@1", "punct": "1"}])
def test_prefix_unstable_strategy_is_refused(strategy: dict) -> None:
    model = make_model(len(strategy), strategy=strategy)
    key = list(strategy)[-1]
    with pytest.raises(ValueError, match=f"strategy '{key}'.*prefix-stable"):
        generate(model, b"abc", 4)


def test_bad_arguments() -> None:
    model = make_model(1)
    for kw, key in [
        ({"max_new_bytes": -1}, "max_new_bytes"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": b""}, "stop"),
    ]:
        with pytest.raises(ValueError, match=key):
            generate(model, b"abc", **{"max_new_bytes": 4, **kw})
    with pytest.raises(TypeError, match=r"prompts\[0\].*encode"):
        generate(model, ["abc"], 4)
    assert generate(model, [b"a", b"b"], 0) == [b"", b""]


def test_from_pretrained_roundtrip_and_errors(tmp_path) -> None:
    model = make_model(2, "repeat", seed=6)
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    loaded = AUModel.from_pretrained(str(ckpt))
    want = generate(model, PROMPTS[0], 16, temperature=0.0)
    assert loaded.generate(PROMPTS[0], max_new_bytes=16, temperature=0.0) == want
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        AUModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        AUModel.from_pretrained(tmp_path)
    other = save_pretrained(make_model(2, "multilinear"), tmp_path / "other")
    (other / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256 .* does not match"):
        AUModel.from_pretrained(other)  # the digest is the first check to see other weights
    with pytest.raises(CheckpointError, match="do not match the config"):
        AUModel.from_pretrained(other, verify=False)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256"):
        AUModel.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        AUModel.from_pretrained(ckpt, verify=False)


def test_flipped_weight_bytes_are_refused(tmp_path) -> None:
    """Corrupt tensor data passes safetensors' header checks; the recorded SHA-256 catches it."""
    import hashlib
    import json

    from aunet.checkpoint import file_sha256, load_pretrained

    model = make_model(2, "repeat", seed=6)
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    recorded = json.loads((ckpt / "config.json").read_text())["weights_sha256"]
    assert recorded == hashlib.sha256(weights.read_bytes()).hexdigest() == file_sha256(weights)
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = bytes(b ^ 0xFF for b in data[mid : mid + 4096])  # 4 KB flipped
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{weights}: SHA-256 .* recorded in config.json"):
        load_pretrained(ckpt)
    loaded = load_pretrained(ckpt, verify=False)  # the opt-out loads the damaged weights as is
    changed = [
        k for k, v in model.state_dict().items() if not torch.equal(v, loaded.state_dict()[k])
    ]
    assert changed, "the flipped bytes should have changed some tensor"


def test_from_pretrained_lingua_dir(tmp_path) -> None:
    interop = pytest.importorskip("aunet.interop")
    model = make_model(1, "multilinear", seed=8, upsampling_positions=16, max_seqlens=[64, 32])
    out = interop.save_lingua_checkpoint(model, tmp_path / "lingua", seq_len=64)
    loaded = AUModel.from_pretrained(out)
    want = generate(model, PROMPTS[1], 16, temperature=0.0)
    assert loaded.generate(PROMPTS[1], max_new_bytes=16, temperature=0.0) == want


def test_mlflow_uri_without_a_store_fails_in_one_line_and_creates_nothing(tmp_path) -> None:
    """No tracking URI and no ./mlflow.db: rc 2 and one line naming the store looked for, not an
    empty ./mlflow.db created by MLflow in the current directory (issue 18 item 12); the library
    call alike."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from aunet.api import AUModel
    from aunet.checkpoint import CheckpointError

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    source = "runs:/0123456789abcdef0123456789abcdef/final"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.generate", source, "--prompt", "hi"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"error: {source}: no MLflow tracking store: {tmp_path.resolve()}/mlflow.db (the default) "
        "does not exist; set MLFLOW_TRACKING_URI or --tracking-uri\n"
    )
    assert list(tmp_path.iterdir()) == []
    old, cwd = os.environ.pop("MLFLOW_TRACKING_URI", None), os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="no MLflow tracking store"):
            AUModel.from_pretrained(source)
    finally:
        os.chdir(cwd)
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
    assert list(tmp_path.iterdir()) == []


def test_runs_uri_resolves_in_a_plain_python_without_any_export(tmp_path) -> None:
    """The spec's default store is MLflow's own default, ./mlflow.db (issue 20): a run logged
    there is read back by a bare ``python -c`` in that directory, by MLflow itself and by
    ``AUModel.from_pretrained``, with no MLFLOW_TRACKING_URI anywhere."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    from pipelines import tracking
    from pipelines.paths import DEFAULT_TRACKING_URI, absolute_tracking_uri

    model = make_model(2, "repeat", seed=6)
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    uri = absolute_tracking_uri(DEFAULT_TRACKING_URI, str(tmp_path))
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.get_or_create_experiment(uri, "e")
    run_id = tracking.create_run(uri, exp, "r", {})
    MlflowClient(uri).log_artifacts(run_id, str(ckpt), "final")
    want = generate(model, PROMPTS[0], 8, temperature=0.0)
    code = (
        "import sys, mlflow\n"
        "from aunet.api import AUModel\n"
        "print(mlflow.get_tracking_uri())\n"
        f"m = AUModel.from_pretrained('runs:/{run_id}/final')\n"
        f"sys.stdout.write(m.generate({PROMPTS[0]!r}, max_new_bytes=8, temperature=0.0).hex())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    default, got = out.stdout.splitlines()
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow.db"  # MLflow's own default
    assert bytes.fromhex(got) == want
