"""The body of ``POST /generate`` (docs/serving.md, The API): parsed and checked before anything
reaches the scheduler, so that a bad request is an HTTP 400 with a one-line reason naming the key
at fault and never costs a decode step. Pure Python: unit-testable without Ray or Serve.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from aunet.decoding import Sampling

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
