"""The Ray Serve application behind ``python -m pipelines.serve`` (docs/serving.md).

``POST /generate`` with a JSON object:

- ``prompt``: UTF-8 text, or ``{"prompt_b64": "..."}`` (also accepted as a top-level
  ``prompt_b64``) for arbitrary bytes;
- ``max_new_bytes`` (default 256), ``temperature`` (1.0), ``top_k``, ``top_p``, ``stop`` (text,
  not returned), ``seed``, ``ignore_eos`` (false): as ``aunet.generate.generate`` takes them;
- ``stream``: false -> one JSON object ``{"text", "b64", "generated_bytes"}``; true -> the raw
  bytes, streamed as they are generated.

Requests are continuously batched (``aunet.decoding.Decoder``): each replica runs one scheduler
loop that, between two decode steps, admits queued requests up to the max batch size (their
prompts are prefilled and join the running generation) and drops finished ones, so a finished
request's slot is taken at the next step. Each row has its own settings and RNG, so a request
returns exactly what ``generate`` returns for its prompt and seed, whatever else shares the batch
and whenever it joined. A BPE model is served with its checkpoint's tokenizer. A bad request is
HTTP 400 with a one-line reason; past ``max_queued_requests`` Serve answers 503. Application
metrics (``aunet_*``) go to Ray's Prometheus endpoint next to Serve's own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from aunet.decoding import Decoder, Sampling

KEYS = ("prompt", "prompt_b64", "max_new_bytes", "temperature", "top_k", "top_p", "stop", "seed")
KEYS += ("ignore_eos", "stream")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: bounds on the work one client can queue."""

    max_prompt_bytes: int = 16384
    max_new_bytes: int = 4096
    max_body_bytes: int = 65536


@dataclass(frozen=True)
class Job:
    """One parsed request."""

    prompt: bytes
    sampling: Sampling
    stream: bool


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; the message is the one-line reason."""


def _number(body: dict, key: str, default: Any, kind: type) -> Any:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(
            f"{key}: expected {'a number' if kind is float else 'an integer'}, got "
            f"{json.dumps(value)[:40]}"
        )
    return kind(value)


def parse_request(raw: bytes, limits: Limits = Limits()) -> Job:
    """Request body -> Job; BadRequest names the key at fault."""
    if len(raw) > limits.max_body_bytes:
        raise BadRequest(f"body: {len(raw)} bytes, over the limit of {limits.max_body_bytes}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body: not JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(KEYS))
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown key (expected some of {', '.join(KEYS)})")
    prompt, b64 = body.get("prompt"), body.get("prompt_b64")
    if isinstance(prompt, dict):
        if set(prompt) != {"prompt_b64"}:
            raise BadRequest('prompt: an object must be exactly {"prompt_b64": "..."}')
        prompt, b64 = None, prompt["prompt_b64"]
    if (prompt is None) == (b64 is None):
        raise BadRequest("prompt: give exactly one of prompt (text) and prompt_b64 (base64)")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt: expected a string, got {type(prompt).__name__}")
        data = prompt.encode("utf-8", "surrogatepass")
    else:
        if not isinstance(b64, str):
            raise BadRequest(f"prompt_b64: expected a base64 string, got {type(b64).__name__}")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("prompt_b64: not valid base64") from None
    if len(data) > limits.max_prompt_bytes:
        raise BadRequest(f"prompt: {len(data)} bytes, over the limit of {limits.max_prompt_bytes}")
    stop = body.get("stop")
    if stop is not None and (not isinstance(stop, str) or not stop):
        raise BadRequest("stop: expected a non-empty string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: expected true or false")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos: expected true or false")
    sampling = Sampling(
        max_new_bytes=_number(body, "max_new_bytes", 256, int),
        temperature=_number(body, "temperature", 1.0, float),
        top_k=_number(body, "top_k", None, int),
        top_p=_number(body, "top_p", None, float),
        stop=stop.encode("utf-8", "surrogatepass") if stop else None,
        seed=_number(body, "seed", None, int),
        ignore_eos=ignore_eos,
    )
    if sampling.temperature is None:
        raise BadRequest("temperature: expected a number, got null")
    if sampling.max_new_bytes is None or sampling.max_new_bytes > limits.max_new_bytes:
        raise BadRequest(
            f"max_new_bytes: expected an integer in [0, {limits.max_new_bytes}], got "
            f"{sampling.max_new_bytes}"
        )
    try:
        sampling.check()
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return Job(data, sampling, stream)


class _Metrics:
    """The application's own metrics, exported with Serve's (docs/serving.md, Metrics)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "aunet_requests", "Generation requests by HTTP status.", tag_keys=("status",)
        )
        self.bytes = metrics.Counter("aunet_generated_bytes", "Bytes generated for clients.")
        self.ttfb = metrics.Histogram(
            "aunet_time_to_first_byte_seconds",
            "From a request's arrival to its first generated byte.",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
        )
        self.batch = metrics.Histogram(
            "aunet_batch_size",
            "Requests in the running generation, per scheduler round.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self.rate = metrics.Gauge(
            "aunet_bytes_per_second", "Generated bytes per second over the latest busy second."
        )


class _Request:
    """One request in the scheduler: its job, where its bytes go (an exception ends it with an
    error, None ends it), and whether its client went away."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.out: asyncio.Queue = asyncio.Queue()
        self.gone = False


class AUNetServer:
    """One replica: a loaded model and one scheduler loop over a continuous batch (the module
    docstring)."""

    def __init__(
        self,
        source: str,
        quantize: str | None = None,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        limits: dict | None = None,
        threads: int | None = None,
        step_budget_s: float = 0.05,
    ) -> None:
        import torch

        from aunet.api import AUModel

        if threads:
            torch.set_num_threads(threads)
        loaded = AUModel.from_pretrained(source, quantize=quantize)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer  # a BPE model's tokenizer
        self.limits = Limits(**(limits or {}))
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.step_budget_s = step_budget_s
        self.metrics = _Metrics()
        self._queue, self._task = None, None  # made on first use: they need the running loop

    def _submit(self, request: _Request) -> None:
        """Queue a request; start the scheduler (again, should it ever have stopped)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._schedule())
        self._queue.put_nowait(request)

    async def _admit(self, running: int) -> list[_Request]:
        """Queued requests to join before the next step, up to the batch size. With nothing
        running, wait for one and then up to ``batch_wait_timeout_s`` for more (one prefill for
        a burst); while generating, take only what is already waiting."""
        assert self._queue is not None
        new: list[_Request] = []
        if not running:
            new.append(await self._queue.get())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.batch_wait_timeout_s
            while len(new) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                try:
                    new.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
        while running + len(new) < self.max_batch_size and not self._queue.empty():
            new.append(self._queue.get_nowait())
        return [r for r in new if not r.gone]

    async def _schedule(self) -> None:
        """The replica's one generation loop: between two decode steps, drop requests whose
        client left, admit queued ones (their prompts are prefilled and join the batch), run the
        step in a worker thread (the replica keeps accepting requests) and hand each request its
        bytes. A failing step fails the requests it held, never the loop."""
        decoder = Decoder(self.model, self.tokenizer)
        live: dict[int, _Request] = {}
        ids, window_bytes, window_start = 0, 0, time.perf_counter()
        while True:
            idle = not live
            new = await self._admit(len(live))
            if idle:
                window_bytes, window_start = 0, time.perf_counter()  # the rate counts busy time
            gone = [k for k, r in live.items() if r.gone]
            keys = list(range(ids, ids + len(new)))
            ids += len(new)
            for k in gone:
                live.pop(k)
            live.update(zip(keys, new))
            if not live:
                continue

            self.metrics.batch.observe(len(live))  # once per round (one or more steps)
            try:
                out = await asyncio.to_thread(
                    self._round, decoder, new, gone, keys, [*live.values()]
                )
            except Exception as e:  # noqa: BLE001 - handed to every request of the batch
                for r in live.values():
                    r.out.put_nowait(e)
                live, decoder = {}, Decoder(self.model, self.tokenizer)
                continue
            for k, (chunk, done) in out.items():
                r = live[k]
                if chunk:
                    r.out.put_nowait(chunk)
                    window_bytes += len(chunk)
                if done:
                    r.out.put_nowait(None)
                    del live[k]
            now = time.perf_counter()
            if now - window_start >= 1 or not live:
                if window_bytes > 0:  # Counter.inc refuses 0
                    self.metrics.bytes.inc(window_bytes)
                    self.metrics.rate.set(window_bytes / max(now - window_start, 1e-9))
                window_bytes, window_start = 0, now

    def _round(self, decoder: Decoder, new: list, gone: list, keys: list, live: list) -> dict:
        """One scheduler round in the worker thread: departures, arrivals (one prefill), steps."""
        decoder.drop(gone)
        decoder.add([r.job.prompt for r in new], [r.job.sampling for r in new], keys)
        return self._steps(decoder, live, first=bool(new))

    def _steps(self, decoder: Decoder, live: list[_Request], first: bool) -> dict[int, list]:
        """Decode steps in one worker-thread round: {key: [bytes, finished]}. Steps go on for up
        to ``step_budget_s`` while no request finished, no client left and nothing waits for a
        free slot: a round per step would pay the thread hop, the event loop and a streamed
        message per step, which cost more than a step of a small model (docs/serving.md). A
        round that admitted requests (``first``) ends after one step: their first bytes go out
        at once, and the budget sets only the later chunks' granularity."""
        out: dict[int, list] = {}
        start = time.perf_counter()
        while True:
            finished = False
            for k, (chunk, done) in decoder.step().items():
                got = out.setdefault(k, [b"", False])
                got[0] += chunk
                got[1] = done
                finished = finished or done
            if (
                first
                or finished
                or not len(decoder)
                or time.perf_counter() - start >= self.step_budget_s
                or any(r.gone for r in live)
                or (
                    self._queue is not None
                    and self._queue.qsize()
                    and len(decoder) < self.max_batch_size
                )
            ):
                return out

    async def _bytes(self, job: Job, arrived: float) -> AsyncIterator[bytes]:
        """The request's bytes as the scheduler releases them. Chunks that queued up while the
        previous one was being sent go out together: one message per step and request would
        make the streaming path, not the model, the limit of a large batch."""
        request = _Request(job)
        self._submit(request)
        first, done = True, False
        try:
            while not done:
                item, parts = await request.out.get(), []
                while True:
                    if item is None:
                        done = True
                        break
                    if isinstance(item, Exception):
                        raise item
                    parts.append(item)
                    if request.out.empty():
                        break
                    item = request.out.get_nowait()
                if parts:
                    if first:
                        self.metrics.ttfb.observe(time.perf_counter() - arrived)
                        first = False
                    yield b"".join(parts)
        finally:
            request.gone = True  # a client that left mid-stream frees its row at the next step

    async def __call__(self, request: Request) -> Response:
        arrived = time.perf_counter()
        if request.url.path.rstrip("/").endswith("/healthz"):
            return PlainTextResponse("ok\n")
        if not request.url.path.rstrip("/").endswith("/generate"):
            return self._status(PlainTextResponse("not found: POST /generate\n", 404))
        if request.method != "POST":
            return self._status(PlainTextResponse("method not allowed: POST /generate\n", 405))
        try:
            job = parse_request(await request.body(), self.limits)
        except BadRequest as e:
            return self._status(PlainTextResponse(f"bad request: {e}\n", 400))
        if job.stream:
            self.metrics.requests.inc(tags={"status": "200"})
            return StreamingResponse(
                self._bytes(job, arrived), media_type="application/octet-stream"
            )
        out = b"".join([c async for c in self._bytes(job, arrived)])
        return self._status(
            JSONResponse(
                {
                    "text": out.decode("utf-8", errors="replace"),
                    "b64": base64.b64encode(out).decode("ascii"),
                    "generated_bytes": len(out),
                }
            )
        )

    def _status(self, response: Response) -> Response:
        self.metrics.requests.inc(tags={"status": str(response.status_code)})
        return response


def build(
    source: str,
    *,
    replicas: int = 1,
    max_batch_size: int = 16,
    quantize: str | None = None,
    max_queued_requests: int | None = None,
    batch_wait_timeout_s: float = 0.01,
    limits: dict | None = None,
    num_cpus: float = 1,
    step_budget_s: float = 0.05,
) -> serve.Application:
    """The bound Serve application. ``max_ongoing_requests`` is two batches per replica: one
    running, one waiting in the replica's own queue to take a slot at the next step (a request
    held back by Serve's router instead waits for its retry); ``max_queued_requests`` (default
    4 batches) bounds the wait: past it Serve answers 503 instead of queueing without end.
    ``step_budget_s``: how long one scheduler round may decode before its bytes go out (a
    streamed answer's granularity; docs/serving.md, Batching)."""
    if not step_budget_s > 0:
        raise ValueError(f"step_budget_s: expected > 0, got {step_budget_s!r}")
    if source and "://" not in source and ":/" not in source and os.path.exists(source):
        source = os.path.abspath(source)  # replicas run in Ray's session directory
    deployment = serve.deployment(AUNetServer).options(
        name="aunet",
        num_replicas=replicas,
        max_ongoing_requests=2 * max_batch_size,
        max_queued_requests=max_queued_requests or 4 * max_batch_size,
        ray_actor_options={"num_cpus": num_cpus},
    )
    return deployment.bind(
        source,
        quantize,
        max_batch_size,
        batch_wait_timeout_s,
        limits,
        max(1, int(num_cpus)),
        step_budget_s,
    )


def app_builder(args: dict) -> serve.Application:
    """``serve run`` entry (experiments/serve/): the keys of ``build`` plus ``source``."""
    args = dict(args)
    try:
        source = args.pop("source")
    except KeyError:
        raise ValueError(
            "serve config args: 'source' (checkpoint dir or MLflow URI) is required"
        ) from None
    return build(str(source), **args)
