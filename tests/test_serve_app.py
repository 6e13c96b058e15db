"""The Ray Serve application on loopback against direct generation (docs/serving.md).

One module-scoped app, served from a ``models:/`` URI of a SQLite model registry, reused by every
test: concurrent requests (greedy, seeded sampling, stop strings, streamed or not) return what
``generate`` returns; bad requests get 400 with one line; overload gets 503 and the app keeps
serving; the application's metrics reach Ray's Prometheus endpoint.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from netutil import free_port

from aunet.api import AUModel
from aunet.checkpoint import save_pretrained
from aunet.config import BOS_ID, AUNetConfig
from aunet.generate import generate
from aunet.model import AUNet
from aunet.splitting import Splitter
from aunet.tokenizer import BPETokenizer

pytestmark = pytest.mark.slow

MAX_BATCH = 4


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(base URL, metrics URL, the model served): a checkpoint registered in a SQLite model
    registry and served from its models:/ URI; Serve and Ray are shut down after the module."""
    import mlflow
    import ray
    from ray import serve

    from pipelines.serve import log_generation_model
    from pipelines.serve_app import build

    tmp = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    cfg = AUNetConfig(
        dimensions=[16, 32], layers=[1, 1], head_dims=[8, 8], sliding_windows=[8, 4], multiple_of=16
    )
    model = AUNet(cfg).eval()
    ckpt = save_pretrained(model, tmp / "ckpt")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    store = f"sqlite:///{tmp}/mlruns.db"
    mlflow.set_tracking_uri(store)  # exported to the environment: the replicas inherit it
    exp = mlflow.create_experiment("serve", artifact_location=(tmp / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    log_generation_model(ckpt, registered_model_name="aunet-serve-test")
    http, metrics = free_port(), free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=metrics,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http})
        application = build(
            "models:/aunet-serve-test/1",
            max_batch_size=MAX_BATCH,
            max_queued_requests=4 * MAX_BATCH,
            batch_wait_timeout_s=0.05,
            limits={"max_prompt_bytes": 64, "max_new_bytes": 300},
        )
        serve.run(application, name="aunet", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics", model
    finally:
        serve.shutdown()
        ray.shutdown()
        mlflow.set_tracking_uri(old)


def post(url: str, body) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/generate", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


REQUESTS = [
    {"prompt": "The quick brown fox", "max_new_bytes": 40, "temperature": 0},
    {"prompt": "caf\u00e9 au lait", "max_new_bytes": 25, "seed": 5},
    {
        "prompt_b64": base64.b64encode(b"\xff\xfe bytes").decode(),
        "max_new_bytes": 33,
        "seed": 1,
        "ignore_eos": True,
    },
    {"prompt": {"prompt_b64": base64.b64encode(b"nested").decode()}, "max_new_bytes": 7, "seed": 2},
    {"prompt": "", "max_new_bytes": 30, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "seed": 9},
    {"prompt": "x", "max_new_bytes": 0},
]


def direct(model: AUNet, body: dict, tokenizer: BPETokenizer | None = None) -> bytes:
    prompt = body.get("prompt", {"prompt_b64": body.get("prompt_b64")})
    prompt = base64.b64decode(prompt["prompt_b64"]) if isinstance(prompt, dict) else prompt.encode()
    stop = body["stop"].encode() if "stop" in body else None
    keys = ("max_new_bytes", "temperature", "top_k", "top_p", "seed", "ignore_eos")
    kw = {k: body[k] for k in keys if k in body}
    return generate(model, prompt, **{"temperature": 1.0, **kw}, stop=stop, tokenizer=tokenizer)


def test_concurrent_requests_equal_direct_generate(app):
    url, _, model = app
    greedy = direct(model, REQUESTS[0])
    # a two-byte ASCII stop string from the greedy output: its first byte is held back, then cut
    i = next(i for i in range(3, 39) if greedy[i] < 128 and greedy[i + 1] < 128)
    bodies = [*REQUESTS, {**REQUESTS[0], "stop": greedy[i : i + 2].decode()}]
    bodies += [{**b, "stream": True} for b in bodies[:2]]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(lambda b: post(url, b), bodies))
    for body, (status, raw) in zip(bodies, got):
        assert status == 200, raw
        want = direct(model, body)
        if body.get("stream"):
            assert raw == want
        else:
            out = json.loads(raw)
            assert base64.b64decode(out["b64"]) == want and out["generated_bytes"] == len(want)
            assert out["text"] == want.decode("utf-8", "replace")
    assert json.loads(got[0][1])["generated_bytes"] == 40


def test_requests_joining_a_running_generation_equal_direct_generate(app):
    """Continuous batching: requests sent while a long one streams join its generation (they end
    before it does) and still return exactly ``generate``'s bytes."""
    url, _, model = app
    long = {"prompt": "A long one", "max_new_bytes": 300, "temperature": 0.8, "seed": 11}
    want_long = direct(model, long)
    assert len(want_long) == 300, "the long request must run to its limit"
    short = [
        {"prompt": "joins", "max_new_bytes": 12, "temperature": 0},
        {"prompt": "caf\u00e9", "max_new_bytes": 20, "seed": 4, "top_k": 30},
        {"prompt": "x", "max_new_bytes": 9, "seed": 8, "stream": True},
    ]
    started = threading.Event()

    def read_long() -> tuple[bytes, float]:
        data = json.dumps({**long, "stream": True}).encode()
        req = urllib.request.Request(url + "/generate", data=data, method="POST")
        out = b""
        with urllib.request.urlopen(req, timeout=120) as r:
            while chunk := r.read1(65536):
                out += chunk
                started.set()
        return out, time.perf_counter()

    with cf.ThreadPoolExecutor(1 + len(short)) as pool:
        long_future = pool.submit(read_long)
        assert started.wait(60)  # the long generation is running
        got = list(pool.map(lambda b: post(url, b), short))
        short_done = time.perf_counter()
        got_long, long_done = long_future.result()
    assert got_long == want_long
    assert short_done < long_done, "the short requests waited for the long one to end"
    for body, (status, raw) in zip(short, got):
        assert status == 200, raw
        out = raw if body.get("stream") else base64.b64decode(json.loads(raw)["b64"])
        assert out == direct(model, body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "body: not JSON"),
        ([1, 2], "body: expected a JSON object"),
        ({"prompt": "x", "max_tokens": 3}, "max_tokens: unknown key"),
        ({"max_new_bytes": 3}, "prompt: give exactly one"),
        ({"prompt": 5}, "prompt: expected a string"),
        ({"prompt_b64": "%%%"}, "prompt_b64: not valid base64"),
        ({"prompt": "y" * 65}, "prompt: 65 bytes, over the limit of 64"),
        ({"prompt": "x", "max_new_bytes": 301}, "max_new_bytes: expected an integer in [0, 300]"),
        ({"prompt": "x", "max_new_bytes": "3"}, "max_new_bytes: expected an integer"),
        ({"prompt": "x", "temperature": -1}, "temperature: expected >= 0"),
        ({"prompt": "x", "top_p": 1.5}, "top_p: expected a value in (0, 1]"),
        ({"prompt": "x", "top_k": 0}, "top_k: expected an int >= 1"),
        ({"prompt": "x", "stop": ""}, "stop: expected a non-empty string"),
        ({"prompt": "x", "stream": "yes"}, "stream: expected true or false"),
        ({"prompt": "x", "ignore_eos": 1}, "ignore_eos: expected true or false"),
    ],
)
def test_bad_requests_get_400_with_one_line(app, body, reason):
    status, raw = post(app[0], body)
    text = raw.decode()
    assert status == 400 and text.startswith(f"bad request: {reason}"), text
    assert text.count("\n") == 1


def test_overload_gets_503_and_the_app_keeps_serving(app):
    url, _, model = app
    body = {"prompt": "load", "max_new_bytes": 300, "seed": 3}
    # 60 requests released together against room for 2 x MAX_BATCH running and 4 x MAX_BATCH
    # queued: with continuous batching short answers finish fast, so arrivals spread over the
    # pool's start-up could otherwise all fit.
    n = 60
    start = threading.Barrier(n)

    def one(_):
        start.wait(timeout=60)
        return post(url, body)

    with cf.ThreadPoolExecutor(n) as pool:
        got = list(pool.map(one, range(n)))
    codes = sorted(status for status, _ in got)
    assert set(codes) == {200, 503} and codes.count(200) >= MAX_BATCH, codes
    want = direct(model, body)
    assert all(base64.b64decode(json.loads(raw)["b64"]) == want for s, raw in got if s == 200)
    assert post(url, REQUESTS[0])[0] == 200


def test_metrics_reach_the_prometheus_endpoint(app):
    url, metrics_url, _ = app
    assert post(url, REQUESTS[1])[0] == 200
    # a batch that generates nothing at all (a zero-byte counter increment must not fail it)
    status, raw = post(url, {"prompt": "x", "max_new_bytes": 0, "stream": True})
    assert (status, raw) == (200, b"")
    want = {
        "ray_aunet_requests_total",
        "ray_aunet_generated_bytes_total",
        "ray_aunet_time_to_first_byte_seconds_count",
        "ray_aunet_batch_size_count",
        "ray_aunet_bytes_per_second",
        "ray_serve_num_http_requests_total",  # one of Serve's own
    }
    found: dict[str, float] = {}
    for _ in range(40):  # the metrics agent exports every few seconds
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        found = {}
        for line in text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in want:
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if set(found) == want:
            break
        time.sleep(1)
    assert set(found) == want, sorted(want - set(found))
    assert found["ray_aunet_requests_total"] >= len(REQUESTS)
    assert found["ray_aunet_generated_bytes_total"] >= 40


def test_bpe_model_is_served_with_its_tokenizer(app, tmp_path):
    """A BPE checkpoint (saved with its tokenizer) served as a second application: its answers
    equal ``generate(..., tokenizer=)``, token healing of a prompt cut mid-word included."""
    from ray import serve

    from pipelines.serve_app import build

    url = app[0]
    text = b"the cat sat on the mat and the dog sat on the log; " * 20
    tok = BPETokenizer.train([text, b"a world of words, the worldly wordsmith"], 300)
    torch.manual_seed(2)
    cfg = AUNetConfig(
        dimensions=[32],
        layers=[1],
        head_dims=[16],
        multiple_of=16,
        vocab_size=tok.vocab_size,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
    )
    model = AUNet(cfg).eval()
    ckpt = save_pretrained(model, tmp_path / "bpe", tokenizer=tok)
    serve.run(build(str(ckpt), max_batch_size=4), name="bpe", route_prefix="/bpe", blocking=False)
    while serve.status().applications["bpe"].status != "RUNNING":
        time.sleep(0.5)
    bodies = [
        {"prompt": "the cat sat on the m", "max_new_bytes": 30, "temperature": 0},
        {"prompt": "the wor", "max_new_bytes": 25, "seed": 3, "stop": "t"},
        {"prompt": "", "max_new_bytes": 17, "seed": 1, "top_p": 0.9, "stream": True},
    ]
    try:
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(lambda b: post(url + "/bpe", b), bodies))
    finally:
        serve.delete("bpe")
    for body, (status, raw) in zip(bodies, got):
        assert status == 200, raw
        out = raw if body.get("stream") else base64.b64decode(json.loads(raw)["b64"])
        assert out == direct(model, body, tok)
    assert len(base64.b64decode(json.loads(got[0][1])["b64"])) == 30


def test_int8_model_generates(tmp_path):
    torch.manual_seed(1)
    model = AUNet(
        AUNetConfig(dimensions=[32, 64], layers=[1, 1], head_dims=[8, 8], multiple_of=16)
    ).eval()
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    q = AUModel.from_pretrained(ckpt, quantize="int8")
    assert q.model.vocab._get_name() == "DynamicQuantizedLinear"
    out = q.generate(b"The quick", max_new_bytes=20, temperature=0.0)
    assert len(out) == 20
    tokens = torch.tensor([[BOS_ID, *b"The quick"]])
    levels = torch.tensor([[1, *Splitter(model.config.split_strategy).levels(b"The quick")]])
    logits, ref = q.model(tokens, levels), model(tokens, levels)
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()
    with pytest.raises(ValueError, match="quantize: expected one of"):
        AUModel.from_pretrained(ckpt, quantize="int4")
