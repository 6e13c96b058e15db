"""The BPE Transformer baseline (issue 21): config, FLOPs per byte vs torch's counter, checkpoints
with a verified tokenizer, and generation with token healing against a naive uncached re-run."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from aunet.api import AUModel
from aunet.checkpoint import (
    TOKENIZER_FILE,
    CheckpointError,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)
from aunet.config import AUNetConfig, ConfigError
from aunet.decoding import Sampling, decode_rows
from aunet.evaluation import (
    ChoiceItem,
    aggregate,
    greedy_bytes,
    make_char_tasks,
    score_char_tasks,
    score_choices,
    score_continuations,
    score_texts,
)
from aunet.flops import flops_per_byte, flops_per_token, num_params, steps_for_budget
from aunet.generate import TokenVocab, generate, heal, sample_next
from aunet.model import AUNet
from aunet.tokenizer import BPETokenizer

DATA = Path(__file__).resolve().parents[1] / "experiments" / "data"


def corpus() -> list[bytes]:
    with gzip.open(DATA / "quickstart.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"].encode("utf-8") for line in f]


@pytest.fixture(scope="module")
def docs() -> list[bytes]:
    return corpus()


@pytest.fixture(scope="module")
def tok(docs) -> BPETokenizer:
    return BPETokenizer.train(docs[::6], 1024)


pytestmark = pytest.mark.usefixtures("one_thread")


def bpe_config(tok: BPETokenizer, **kw) -> AUNetConfig:
    cfg = dict(dimensions=[32], layers=[2], head_dims=[16], multiple_of=16, sliding_windows=[12])
    cfg.update(kw)
    return AUNetConfig(**cfg, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)


def bpe_model(tok: BPETokenizer, seed: int = 0, **kw) -> AUNet:
    torch.manual_seed(seed)
    return AUNet(bpe_config(tok, **kw)).double().eval()


# ------------------------------------------------------------------------------------ config
def test_config_vocab_defaults_and_errors(tok, tmp_path):
    byte = AUNetConfig(dimensions=[32], layers=[1], head_dims=[16])
    assert (byte.vocab_size, byte.bos_id, byte.eos_id, byte.is_bytes) == (258, 256, 257, True)
    d = byte.to_dict()
    assert d["vocab_size"] == 258
    old = {k: v for k, v in d.items() if k not in ("vocab_size", "bos_id", "eos_id")}
    assert AUNetConfig.from_dict(old) == byte  # config.json written before the fields existed
    two = {"dimensions": [32, 64], "layers": [1, 1], "head_dims": [16, 16]}
    with pytest.raises(ConfigError, match=r"^model\.vocab_size: 1027 != 258.*1-stage"):
        AUNetConfig.from_dict({**two, "vocab_size": 1027, "bos_id": 1024, "eos_id": 1025})
    with pytest.raises(ConfigError, match=r"^model\.bos_id"):
        AUNetConfig.from_dict({**old, "vocab_size": 1027, "bos_id": 1027, "eos_id": 1025})
    cfg = bpe_config(tok)
    assert not cfg.is_bytes and AUNetConfig.from_dict(cfg.to_dict()) == cfg
    model = AUNet(cfg)
    assert model.tok_embeddings.weight.shape == (tok.vocab_size, 32)
    assert model.vocab.weight.shape == (tok.vocab_size, 32)
    assert num_params(cfg) == model.num_params()


# ------------------------------------------------------------------------------------ FLOPs
def test_flops_per_byte_match_torch_flop_counter(tok, docs):
    """As tests/test_flops.py checks byte models: torch's count of a real forward + backward over
    B windows of T tokens, divided by the bytes those tokens hold (measured bytes per token)."""
    cfg = bpe_config(tok, dimensions=[64], head_dims=[16], sliding_windows=[64], multiple_of=32)
    T, B = 256, 2
    ids = torch.cat([torch.as_tensor(t) for t in tok.encode_batch(docs[1::7][:40])])
    assert len(ids) >= B * T
    tokens = ids[: B * T].view(B, T)
    nbytes = int(tok.token_lengths[tokens.numpy()].sum())
    bpt = nbytes / (B * T)
    assert 2.0 < bpt < 6.0  # real compression, not a byte model in disguise
    torch.manual_seed(0)
    model = AUNet(cfg)
    levels = torch.zeros_like(tokens)
    for convention, math_sdpa in (("dense", True), ("none", False)):
        counter = FlopCounterMode(display=False)
        with counter:
            if math_sdpa:
                with sdpa_kernel(SDPBackend.MATH):
                    model(tokens, levels, targets=tokens).loss.backward()
            else:
                model(tokens, levels, targets=tokens).loss.backward()
        per_byte = counter.get_total_flops() / nbytes
        ours = flops_per_byte(cfg, T, bytes_per_token=bpt, attention=convention)
        assert ours == pytest.approx(per_byte, rel=0.02), convention
        per_token = flops_per_token(cfg, T, attention=convention)
        assert ours == pytest.approx(per_token / bpt, rel=1e-12)
        model.zero_grad()
    # the head is counted at V: forward + backward of the (D x V) matmul per position
    byte = cfg.replace(vocab_size=258, bos_id=256, eos_id=257)
    assert flops_per_token(cfg, T) - flops_per_token(byte, T) == 6 * 64 * (tok.vocab_size - 258)


def test_flops_per_byte_arguments(tok):
    byte = AUNetConfig(dimensions=[32, 64], layers=[1, 1], head_dims=[16, 16])
    assert flops_per_byte(byte, 512) == flops_per_byte(byte, 512, bytes_per_token=1.0)
    assert flops_per_byte(byte, 512) == flops_per_token(byte, 512)  # bit for bit
    with pytest.raises(ValueError, match="bytes_per_token: a byte model"):
        flops_per_byte(byte, 512, bytes_per_token=4.0)
    cfg = bpe_config(tok)
    with pytest.raises(ValueError, match="bytes_per_token: a token model"):
        flops_per_byte(cfg, 128)
    # a step is batch x seq_len tokens = batch x seq_len x bpt bytes
    fpt = flops_per_token(cfg, 128)
    assert steps_for_budget(cfg, 128, 4, fpt * 128 * 4 * 10.5, bytes_per_token=3.7) == 10


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_writes_and_verifies_the_tokenizer(tok, tmp_path):
    model = bpe_model(tok).float()
    out = save_pretrained(model, tmp_path / "bpe", tokenizer=tok)
    payload = json.loads((out / "config.json").read_text())
    assert payload["tokenizer_sha256"] == tok.sha256
    loaded = load_tokenizer(out)
    assert loaded is not None and loaded.sha256 == tok.sha256
    assert loaded.token_bytes == tok.token_bytes
    x = torch.tensor([[tok.bos_id, *tok.encode(b"hello there").tolist()]])
    with torch.no_grad():
        assert torch.equal(load_pretrained(out)(x, torch.zeros_like(x)), model(x, 0 * x))
    tampered = (out / TOKENIZER_FILE).read_text().replace('"gpt2"', '"llama3"', 1)
    (out / TOKENIZER_FILE).write_text(tampered)
    for load in (load_tokenizer, load_pretrained):
        with pytest.raises(CheckpointError, match=r"tokenizer\.json: SHA-256"):
            load(out)
    (out / TOKENIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        load_pretrained(out)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        save_pretrained(model, tmp_path / "none")
    other = BPETokenizer.train([b"abc abd abe " * 50], 300)
    with pytest.raises(ValueError, match="do not match"):
        save_pretrained(model, tmp_path / "other", tokenizer=other)
    # a byte checkpoint has no tokenizer, also when written over a BPE one
    save_pretrained(model, tmp_path / "over", tokenizer=tok)
    byte = AUNet(AUNetConfig(dimensions=[16], layers=[1], head_dims=[8]))
    save_pretrained(byte, tmp_path / "over")
    assert not (tmp_path / "over" / TOKENIZER_FILE).exists()
    assert load_tokenizer(tmp_path / "over") is None
    assert "tokenizer_sha256" not in json.loads((tmp_path / "over/config.json").read_text())


# ------------------------------------------------------------------------------ generation
def naive_heal(tok: BPETokenizer, ids: list[int]) -> tuple[list[int], bytes]:
    """Back off the last token, then each earlier one while the backed-off bytes are a proper
    prefix of some token (a scan of the whole vocabulary)."""
    if not ids:
        return [], b""
    tb = tok.token_bytes
    k, pending = len(ids) - 1, tb[ids[-1]]
    while k > 0:
        cand = tb[ids[k - 1]] + pending
        if not any(len(t) > len(cand) and t.startswith(cand) for t in tb):
            break
        k, pending = k - 1, cand
    return ids[:k], pending


@torch.no_grad()
def naive_generate(
    model: AUNet,
    tok: BPETokenizer,
    prompt: bytes,
    max_new_bytes: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: bytes | None = None,
    seed: int = 0,
) -> bytes:
    """A full forward over BOS + the whole sequence at every step (no cache), the allowed ids
    recomputed from scratch, the output cut at the first ``stop`` or at ``max_new_bytes``."""
    tb = tok.token_bytes
    context, pending = naive_heal(tok, tok.encode(prompt).tolist())
    seq, out = [tok.bos_id, *context], b""
    rng = torch.Generator().manual_seed(seed)
    while True:
        logits = model(torch.tensor([seq]), torch.zeros(1, len(seq), dtype=torch.long))[0, -1]
        allowed = torch.zeros(tok.vocab_size, dtype=torch.bool)
        for i in range(tok.vocab_size):
            b = tb[i] if i < len(tb) else b""
            if pending:
                allowed[i] = bool(b) and (b.startswith(pending) or pending.startswith(b))
            else:
                allowed[i] = bool(b) or i == tok.eos_id
        t = int(sample_next(logits[None], temperature, top_k, top_p, rng, allowed[None])[0])
        if t == tok.eos_id:
            return out
        b = tb[t]
        n = min(len(b), len(pending))
        assert b[:n] == pending[:n]
        out, pending = out + b[n:], pending[n:]
        if stop is not None and stop in out[:max_new_bytes]:
            return out[: out.index(stop)]
        if len(out) >= max_new_bytes:
            return out[:max_new_bytes]
        seq.append(t)


def mid_token_prompt(tok: BPETokenizer) -> bytes:
    """A prompt whose last token is a proper prefix of a longer word token (" wor" / " world")."""
    for t in sorted(tok.token_bytes[256:], key=len, reverse=True):
        if t.startswith(b" ") and t[1:].isalpha() and len(t) >= 6:
            return b"It is" + t[:-2]
    raise AssertionError("no long word token in the vocabulary")


def test_heal_backs_off_partial_tokens(tok):
    vocab = TokenVocab(tok)
    prompts = [b"The cat sat on the", mid_token_prompt(tok), "日本".encode()[:4], b"", b"\xe6"]
    for p in prompts:
        ids = tok.encode(p).tolist()
        context, pending = heal(vocab, ids)
        assert (context, pending) == naive_heal(tok, ids)
        assert tok.decode(context) + pending == p
        assert (pending == b"") == (p == b"")
    context, pending = heal(vocab, tok.encode("日本".encode()[:4]).tolist())
    assert (
        pending.startswith(b"\xe6") and tok.decode(context) == "日本".encode()[: 4 - len(pending)]
    )
    # the mid-token prompt's completion is among the allowed ids
    p = mid_token_prompt(tok)
    _, pending = heal(vocab, tok.encode(p).tolist())
    allowed = vocab.starting_with(pending)
    assert any(
        tok.token_bytes[i].startswith(pending) and len(tok.token_bytes[i]) > len(pending)
        for i in torch.nonzero(allowed)[:, 0].tolist()
    )


PROMPTS = [b"The cat sat on the mat. It", "日本".encode()[:4], b"", b"x\x00\xff"]


def test_generate_equals_naive_rerun(tok):
    model = bpe_model(tok, seed=1)
    prompts = [*PROMPTS, mid_token_prompt(tok)]
    greedy = generate(model, prompts, 20, temperature=0.0, tokenizer=tok)
    for p, out in zip(prompts, greedy):
        assert out == naive_generate(model, tok, p, 20), p
        assert len(out) == 20  # an untrained model does not pick EOS here
    for seed, p in enumerate(prompts):
        kw = dict(temperature=0.9, top_k=50, top_p=0.95, seed=seed)
        out = generate(model, p, 24, tokenizer=tok, **kw)
        assert out == naive_generate(model, tok, p, 24, **kw), p
    full = greedy[0]
    stop = full[7:9]
    cut = generate(model, prompts[0], 20, temperature=0.0, stop=stop, tokenizer=tok)
    assert cut == full[: full.find(stop)] == naive_generate(model, tok, prompts[0], 20, stop=stop)
    assert generate(model, prompts[0], 5, temperature=0.0, tokenizer=tok) == full[:5]


def test_generate_eos_and_arguments(tok):
    model = bpe_model(tok, seed=2)
    with torch.no_grad():  # make EOS beat the first greedy token
        bos = torch.tensor([[tok.bos_id]])
        logits = model(bos, 0 * bos)[0, -1]
        logits[torch.as_tensor(tok.token_lengths) == 0] = -torch.inf
        model.vocab.weight[tok.eos_id] = 50 * model.vocab.weight[int(logits.argmax())]
    assert generate(model, b"", 4, temperature=0.0, tokenizer=tok) == b""
    # ignore_eos: the next best token instead, up to the byte limit
    out = generate(model, b"", 12, temperature=0.0, tokenizer=tok, ignore_eos=True)
    assert len(out) == 12 and out.startswith(tok.token_bytes[int(logits.argmax())])
    with pytest.raises(ValueError, match="needs its tokenizer"):
        generate(model, b"a", 4)
    with pytest.raises(ValueError, match="do not match"):
        generate(
            AUNet(AUNetConfig(dimensions=[16], layers=[1], head_dims=[8])), b"a", 4, tokenizer=tok
        )


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def naive_token_logprobs(model: AUNet, seq: list[int], context: int) -> list[float]:
    """float64 log p(seq[j] | the at most ``context - 1`` ids before it), one forward per j."""
    out = []
    for j in range(1, len(seq)):
        x = torch.tensor([seq[max(0, j - context + 1) : j]])
        logits = model(x, torch.zeros_like(x))[0, -1].double()
        out.append(float(torch.log_softmax(logits, -1)[seq[j]]))
    return out


def test_bits_per_byte_equal_naive_per_document(tok, docs):
    model = bpe_model(tok, seed=3)
    texts = [b"The cat sat on the mat.", "日本語の文章 x".encode() + b"\x00\xff"]
    texts += [b"", docs[0][:700]]
    scores = score_texts(model, texts, context=64, stride=24, tokenizer=tok)
    for text, s in zip(texts, scores):
        seq = [tok.bos_id, *tok.encode(text).tolist()]
        assert s.num_bytes == len(text)
        nats = -sum(naive_token_logprobs(model, seq, 64))
        assert s.nats == pytest.approx(nats, rel=1e-6, abs=1e-9)  # float32 scorer
        if len(seq) <= 64 and text:  # fits: one full forward over the document
            x = torch.tensor([seq])
            with torch.no_grad():
                lp = torch.log_softmax(model(x, 0 * x)[0, :-1].double(), -1)
            full = -float(lp.gather(-1, x[0, 1:, None]).sum())
            assert s.bits_per_byte == pytest.approx(full / (math.log(2) * len(text)), rel=1e-6)
    assert len(tok.encode(texts[3])) > 64  # the long document is scored in several windows
    total = aggregate(scores)
    assert total.num_bytes == sum(map(len, texts))


def test_choices_score_the_tokens_holding_the_choice_bytes(tok):
    model = bpe_model(tok, seed=4)
    items = [
        ChoiceItem("The cat sat on the", (" mat.", " hat!", "re was"), 0),  # "the|re"
        ChoiceItem("日本", ("語", "ん"), 0),
        ChoiceItem("", ("abc", " there"), 1),
    ]
    res = score_choices(model, items, batch_size=3, tokenizer=tok)
    tb = tok.token_bytes
    straddled = 0
    for it, row in zip(items, res.loglik):
        ctx = it.context.encode()
        for ch, got in zip(it.choices, row):
            ids = tok.encode(ctx + ch.encode()).tolist()
            # naive junction rule: walk the tokens, keep those whose byte span reaches the choice
            keep, end = [], 0
            for j, t in enumerate(ids):
                end += len(tb[t])
                if end > len(ctx):
                    keep.append(j)
            assert keep and sum(len(tb[ids[j]]) for j in keep) >= len(ch.encode())
            straddled += sum(len(tb[ids[j]]) for j in keep) > len(ch.encode())
            lps = naive_token_logprobs(model, [tok.bos_id, *ids], 10**6)
            assert got == pytest.approx(sum(lps[j] for j in keep), rel=1e-6)
    assert straddled >= 1  # " the" + "re" is one token " there": it counts as the choice's
    pairs = [(it.context.encode(), ch.encode()) for it in items for ch in it.choices]
    conts = score_continuations(model, pairs, tokenizer=tok)
    flat = [v for row in res.loglik for v in row]
    assert [c.loglik for c in conts] == pytest.approx(flat, rel=1e-12)
    assert [c.num_bytes for c in conts] == [len(c) for _, c in pairs]
    # greedy: every token holding the continuation is the argmax (BOS and PAD excluded)
    sampled = torch.as_tensor(tok.token_lengths) > 0
    sampled[tok.eos_id] = True

    @torch.no_grad()
    def naive_greedy(ctx: bytes, cont: bytes) -> bool:
        ids = [tok.bos_id, *tok.encode(ctx + cont).tolist()]
        ends = torch.cumsum(torch.as_tensor(tok.token_lengths)[ids], 0)
        x = torch.tensor([ids])
        logits = model(x, 0 * x)[0].masked_fill(~sampled, -torch.inf)
        return all(
            int(logits[j - 1].argmax()) == ids[j] for j in range(1, len(ids)) if ends[j] > len(ctx)
        )

    assert [c.greedy for c in conts] == [naive_greedy(c, x) for c, x in pairs]
    found = 0
    for ctx in (b"The cat", b"In the beginning", b"And God said", b"x", b"Hello"):
        seq = [tok.bos_id, *tok.encode(ctx).tolist()]
        with torch.no_grad():
            for _ in range(3):
                x = torch.tensor([seq])
                seq.append(int(model(x, 0 * x)[0, -1].masked_fill(~sampled, -torch.inf).argmax()))
        cont = tok.decode(seq[-3:])
        if tok.encode(ctx + cont).tolist() == seq[1:] and tok.eos_id not in seq:
            (c,) = score_continuations(model, [(ctx, cont)], tokenizer=tok)
            assert c.greedy and naive_greedy(ctx, cont)
            found += 1
    assert found >= 1
    # max_len counts tokens; a continuation that cannot fit is an error naming the pair
    with pytest.raises(ValueError, match="pair 0: the continuation has"):
        score_continuations(model, [(b"ab", b"the cat sat on the mat")], max_len=3, tokenizer=tok)
    long = score_continuations(model, [(b"x " * 50, b" mat")], max_len=8, tokenizer=tok)[0]
    ids = tok.encode(b"x " * 50 + b" mat").tolist()
    lps = naive_token_logprobs(model, [tok.bos_id, *ids[-7:]], 10**6)
    first = next(j for j in range(len(ids)) if len(tok.decode(ids[: j + 1])) > 100) - len(ids) + 7
    assert long.loglik == pytest.approx(sum(lps[first:]), rel=1e-6)


def test_char_tasks_decode_bytes(tok):
    model = bpe_model(tok, seed=5)
    run = greedy_bytes(model, tok)
    prompts = [b"Spell cat: ", mid_token_prompt(tok)]
    outs = run(prompts, 9)
    assert outs == [naive_generate(model, tok, p, 9, stop=b"\n") for p in prompts]
    examples = make_char_tasks(["apple", "berry", "cherry", "melon", "grape"], "spell", 3, 0)
    acc = score_char_tasks(examples, run)
    assert acc == sum(
        o.split(b"\n")[0] == e.answer.encode()
        for e, o in zip(examples, run([e.prompt.encode() for e in examples], 13))
    ) / len(examples)


# ------------------------------------------------------------------------------ AUModel
def test_aumodel_round_trip_restores_the_tokenizer(tok, tmp_path):
    model = AUModel(bpe_model(tok, seed=6).float(), tok)
    model.context = 32
    out = model.save_pretrained(tmp_path / "ckpt")
    loaded = AUModel.from_pretrained(out)
    assert loaded.tokenizer is not None and loaded.tokenizer.sha256 == tok.sha256
    assert loaded.context == 32
    prompts = ["The cat sat on the mat. It", "日本".encode()[:4], mid_token_prompt(tok)]
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 40, "seed": 3}):
        a = model.generate(prompts, 16, **kw)
        assert a == loaded.generate(prompts, 16, **kw)
        assert all(isinstance(x, bytes) and len(x) == 16 for x in a)
    assert model.generate("The cat", 8, temperature=0) == loaded.generate(
        b"The cat", 8, temperature=0
    )
    text = "In the beginning God created the heaven and the earth."
    s = loaded.score(text)
    assert s.num_bytes == len(text.encode()) and s.nats == model.score(text.encode()).nats
    x = [tok.bos_id, *tok.encode(text.encode()).tolist()]
    nats = -sum(naive_token_logprobs(loaded.model, x, 32))
    assert s.nats == pytest.approx(nats, rel=1e-5)
    bpb = loaded.bits_per_byte([text, b"x"])
    both = score_texts(loaded.model, [text.encode(), b"x"], 32, tokenizer=tok)
    assert bpb == aggregate(both).bits_per_byte
    with pytest.raises(ValueError, match="needs its tokenizer"):
        AUModel(loaded.model)


def test_decode_rows_equal_generate(tok):
    """The server's per-row decoding (``decode_rows``) gives each row ``generate``'s bytes."""
    model = bpe_model(tok, seed=7)
    prompts = [
        b"The cat sat on the mat. It",
        "日本".encode()[:4],
        b"",
        mid_token_prompt(tok),
    ]
    full = generate(model, prompts[0], 20, temperature=0.0, tokenizer=tok)
    settings = [
        Sampling(20, temperature=0.0, stop=full[6:9]),
        Sampling(11, temperature=0.8, top_p=0.9, seed=1),
        Sampling(0),
        Sampling(17, temperature=1.0, top_k=30, seed=2, stop=b"e"),
    ]
    joined = [b""] * len(prompts)
    for chunks in decode_rows(model, prompts, settings, tokenizer=tok):
        for b, c in enumerate(chunks):
            joined[b] += c or b""
    for p, s, got in zip(prompts, settings, joined):
        kw = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, stop=s.stop, seed=s.seed)
        assert got == generate(model, p, s.max_new_bytes, tokenizer=tok, **kw)
    assert joined[0] == full[:6]
    with pytest.raises(ValueError, match="needs its tokenizer"):
        next(decode_rows(model, prompts, settings))
