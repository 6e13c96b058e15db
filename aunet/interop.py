"""Official lingua AU-Net (``apps/aunet``, commit 437d680) <-> ours: configs, weights, checkpoints.

Why a converter and not a loader shim: the official config is substring-parsed and mutated during
validation, and its state dict carries constant buffers; we map both through explicit tables so a
key or value we do not understand is an error naming it, never a silent guess.

Official consolidated layout (``lingua/checkpoint.py::consolidate_checkpoints``):
``<step>/consolidated/{consolidated.pth, params.json}``; ``consolidated.pth`` is
``{"model": state_dict, "optim": ...}`` and ``params.json`` the whole resolved ``TrainArgs``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aunet.checkpoint import CheckpointError, load_pretrained, save_pretrained
from aunet.config import UPSAMPLING_TO_LINGUA, VOCAB_SIZE, AUNetConfig, ConfigError
from aunet.model import AUNet

LINGUA_TO_UPSAMPLING = {v: k for k, v in UPSAMPLING_TO_LINGUA.items()}
OFFICIAL_POSITIONS = 16  # ``SimpleTransition.max_pos``, hard-coded officially
OFFICIAL_STRATEGY_PREFIXES = ("word", "pretok", "punct")  # the official loader's prefixes
CONSOLIDATED_DIR, CONSOLIDATED_FILE, PARAMS_FILE = "consolidated", "consolidated.pth", "params.json"

# official block keys that are our config fields of the same name (every stage shares the block)
_BLOCK_FIELDS = ("rope_theta", "multiple_of", "ffn_dim_multiplier", "norm_eps", "n_kv_heads")
_BLOCK_FIELDS += ("init_base_std", "init_std_factor")
# overwritten per stage by HierarchicalTransformer, so their values never reach the math
_BLOCK_PLACEHOLDERS = ("dim", "n_layers", "max_seqlen", "head_dim")
_MODEL_LISTS = ("dimensions", "layers", "head_dims", "sliding_windows", "max_seqlens", "residuals")
_MODEL_KEYS = (*_MODEL_LISTS, "block", "pooling_type", "seed", "vocab_size", "lambda_level")
_MODEL_KEYS += ("norm_eps",)


class InteropError(CheckpointError):
    """An official config/checkpoint cannot be mapped; the message names the key or path."""


# ---------------------------------------------------------------------------------------- config
def _read_mapping(src: str | os.PathLike | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(src, dict):
        return src, "config"
    import yaml  # official lingua configs are YAML; the one place aunet reads YAML (lazily)

    path = Path(src)
    try:
        data = yaml.safe_load(path.read_text())  # params.json is YAML too
    except (OSError, yaml.YAMLError) as e:
        raise InteropError(f"{path}: cannot read official config ({e})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a mapping with 'model' and 'data'")
    return data, str(path)


def config_from_lingua(src: str | os.PathLike | dict[str, Any]) -> AUNetConfig:
    """Official training YAML or ``params.json`` (a path, or a dict with model/data) -> ours."""
    cfg, where = _read_mapping(src)

    def fail(key: str, msg: str) -> InteropError:
        return InteropError(f"{where}: {key}: {msg}")

    model, data = cfg.get("model"), cfg.get("data") or {}
    if not isinstance(model, dict):
        raise fail("model", "missing or not a mapping")
    unknown = sorted(set(model) - set(_MODEL_KEYS))
    if unknown:
        raise fail(f"model.{unknown[0]}", f"unknown key (known: {', '.join(_MODEL_KEYS)})")
    tok = (data.get("tokenizer") or {}).get("name", "bytes")
    if tok != "bytes":
        raise fail("data.tokenizer.name", f"{tok!r}: only the byte tokenizer (vocab 258) maps")
    if model.get("vocab_size", -1) not in (-1, VOCAB_SIZE):
        raise fail("model.vocab_size", f"{model['vocab_size']} != {VOCAB_SIZE} (bytes + BOS/EOS)")
    pooling = model.get("pooling_type", "simple_indexed_matmul")
    if pooling not in LINGUA_TO_UPSAMPLING:
        known = ", ".join(LINGUA_TO_UPSAMPLING)
        raise fail("model.pooling_type", f"cannot map {pooling!r} (known: {known})")

    block = dict(model.get("block") or {})
    kw: dict[str, Any] = {}
    for key, value in block.items():
        if key in _BLOCK_FIELDS:
            kw[key] = value
        elif key == "n_heads":  # overrides dim // head_dim at every stage when set
            dims, hds = model.get("dimensions") or [], model.get("head_dims") or []
            if value is not None and any(d // h != value for d, h in zip(dims, hds)):
                raise fail("model.block.n_heads", f"{value} contradicts dimensions/head_dims")
        elif key not in _BLOCK_PLACEHOLDERS:
            raise fail(f"model.block.{key}", "unknown block option (it may change the math)")
    for key in ("rope_theta", "norm_eps", "ffn_dim_multiplier", "init_base_std"):
        if kw.get(key) is not None:
            kw[key] = float(kw[key])
    if float(model.get("norm_eps", 1e-5)) != kw.get("norm_eps", 1e-5):  # vocab/level-head norms
        raise fail("model.norm_eps", "differs from block.norm_eps: we use one eps everywhere")

    lists = {k: model.get(k) for k in _MODEL_LISTS}
    if lists["sliding_windows"] == []:  # official: `[] or [None] * n`
        lists["sliding_windows"] = None
    caps = lists["max_seqlens"]
    if not isinstance(caps, list) or not caps:
        raise fail("model.max_seqlens", f"expected a list, got {caps!r}")
    caps = list(caps)
    seq_len = data.get("seq_len")
    if isinstance(caps[0], int) and caps[0] < 0:
        if seq_len is None:
            raise fail("data.seq_len", "missing, needed because model.max_seqlens[0] = -1")
        caps[0] = int(seq_len)
    elif seq_len is not None and caps[0] != seq_len:
        raise fail("model.max_seqlens[0]", f"{caps[0]} != data.seq_len {seq_len}")
    lists["max_seqlens"] = caps
    for i, c in enumerate(caps[1:], 1):  # officially -1 there keeps nothing: no uncapped stages
        if not isinstance(c, int) or c < 1:
            raise fail(f"model.max_seqlens[{i}]", f"expected a capacity >= 1, got {c!r}")
    strategy = (data.get("regex") or {}).get("strategy")
    if not isinstance(strategy, dict):
        raise fail("data.regex.strategy", f"missing or not a mapping ({strategy!r})")
    try:
        _require_official_strategy(strategy, "data.regex.strategy")
    except InteropError as e:
        raise InteropError(f"{where}: {e}") from None
    try:
        kw.update(upsampling=LINGUA_TO_UPSAMPLING[pooling], strategy=dict(strategy))
        kw.update(lambda_level=float(model.get("lambda_level", 0.0)), seed=model.get("seed", 42))
        return AUNetConfig(**lists, **kw, upsampling_positions=OFFICIAL_POSITIONS)
    except ConfigError as e:
        field_name = str(e).split(":", 1)[0].split("[", 1)[0]
        prefix = "model.block." if field_name in _BLOCK_FIELDS else "model."
        if field_name == "strategy":
            prefix = "data.regex."
        raise InteropError(f"{where}: {prefix}{e}") from None
    except TypeError as e:
        raise InteropError(f"{where}: model: {e}") from None


def _require_official_strategy(strategy: dict[str, str], where: str) -> None:
    """The official loader knows the word, pretok and punct strategies only: a script stage
    (aunet/scripts.py) or an entropy stage (aunet/entropy.py, a fitted model inside the value)
    has no official spelling, and a key it reads by another prefix would split differently."""
    for key in strategy:
        if not key.startswith(OFFICIAL_STRATEGY_PREFIXES):
            kind = next((k for k in ("script", "entropy") if key.startswith(k)), "custom")
            raise InteropError(
                f"{where}.{key}: the {kind} split strategy cannot be expressed in the official "
                f"format (it splits by {', '.join(OFFICIAL_STRATEGY_PREFIXES)} only); export a "
                "model trained with those"
            )


def config_to_lingua(config: AUNetConfig, seq_len: int) -> dict[str, Any]:
    """Ours -> official ``{"model", "data"}`` mapping (``config_from_lingua`` reads it back)."""
    caps = config.capacities
    if not config.is_bytes:
        raise InteropError(
            f"vocab_size: {config.vocab_size}: only the byte tokenizer (vocab 258) maps to the "
            "official format"
        )
    if config.upsampling_positions != OFFICIAL_POSITIONS:
        raise InteropError(f"upsampling_positions: {config.upsampling_positions} != 16 (official)")
    if caps[0] not in (-1, seq_len):
        raise InteropError(f"max_seqlens[0]: {caps[0]} != seq_len {seq_len} (official forward)")
    if any(c == -1 for c in caps[1:]):
        raise InteropError(f"max_seqlens: {caps}: uncapped stages have no official equivalent")
    _require_official_strategy(config.split_strategy, "strategy")
    model = {k: copy.deepcopy(getattr(config, k)) for k in _MODEL_LISTS}
    model["max_seqlens"] = [seq_len, *caps[1:]]
    model["block"] = {k: getattr(config, k) for k in _BLOCK_FIELDS}
    model.update(pooling_type=config.pooling_type, seed=config.seed, vocab_size=VOCAB_SIZE)
    model.update(lambda_level=config.lambda_level, norm_eps=config.norm_eps)
    data = {"seq_len": seq_len, "tokenizer": {"name": "bytes", "path": None}}
    data["regex"] = {"strategy": config.split_strategy}
    return {"model": model, "data": data}


# ---------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class KeySpec:
    """One official state-dict entry: its name and ours, or for an official-only constant buffer
    ``ours = None`` and ``dims = (d_in, d_out)`` of its transition."""

    official: str
    ours: str | None
    shape: tuple[int, ...]
    dims: tuple[int, int] = (0, 0)


def _block_keys(prefix: str, config: AUNetConfig, s: int) -> list[tuple[str, tuple[int, ...]]]:
    st = config.stages[s]
    d, f, q, kv = st.dim, config.ffn_hidden(st.dim), st.dim, config.kv_heads(s) * st.head_dim
    names = {"attention.wq": (q, d), "attention.wk": (kv, d), "attention.wv": (kv, d)}
    names.update({"attention.wo": (d, q), "attention_norm": (d,), "ffn_norm": (d,)})
    names.update({"feed_forward.w1": (f, d), "feed_forward.w2": (d, f), "feed_forward.w3": (f, d)})
    return [
        (f"{prefix}.layers.{j}.{n}.weight", shp)
        for j in range(st.layers)
        for n, shp in names.items()
    ]


_BUFFERS = ("features_weight", "expand_idx")


def _official_buffers(d_in: int, d_out: int) -> dict[str, torch.Tensor]:
    """``SimpleTransition``'s persistent non-parametric buffers, exactly as it builds them."""
    r = d_out // d_in
    return {
        "features_weight": (torch.arange(1, r + 1) / r).repeat(d_in),
        "expand_idx": torch.arange(d_in).repeat_interleave(r),
    }


def key_map(config: AUNetConfig) -> list[KeySpec]:
    """Every official state-dict key for ``config``, with our name and the expected shape."""
    K, d0, P = config.num_stages, config.dimensions[0], OFFICIAL_POSITIONS
    same: list[tuple[str, tuple[int, ...]]] = [
        ("tok_embeddings.weight", (config.vocab_size, d0)),
        ("vocab_norm.weight", (d0,)),
        ("vocab.weight", (config.vocab_size, d0)),
    ]
    if config.lambda_level > 0:
        same += [("level_mask_norm.weight", (2 * d0,)), ("level_mask.weight", (K + 1, 2 * d0))]
    specs = []
    for s in range(K):
        same += _block_keys(f"encoders.{s}", config, s) + _block_keys(f"decoders.{s}", config, s)
        di, do, t = config.dimensions[s], config.dimensions[s + 1], f"transitions.{s}"
        kind = config.upsampling.removeprefix("nonparam_")
        if config.nonparametric:
            specs += [KeySpec(f"{t}.{n}", None, (do,), (di, do)) for n in _BUFFERS]
        else:
            same += [(f"{t}.down_norm.weight", (di,)), (f"{t}.trans_down.weight", (do, di))]
            same += [(f"{t}.up_norm.weight", (do,)), (f"{t}.trans_up.weight", (di, do))]
        if kind == "multilinear":
            same.append((f"{t}.indexed_linear.weight", (P, di, do)))
            if config.nonparametric:
                same.append((f"{t}.indexed_norm.weight", (do,)))
        elif kind == "repeat":
            same.append((f"{t}.pos_encoding.weight", (P, do)))
    same += _block_keys("trunk", config, K)
    return [KeySpec(k, k, shape) for k, shape in same] + specs


def _check_keys(got: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], what: str) -> None:
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs config {want[k]}"
        for k in sorted(set(got) & set(want))
        if tuple(got[k].shape) != want[k]
    ]
    parts = [f"missing keys {missing}"] * bool(missing)
    parts += [f"unexpected keys {unexpected}"] * bool(unexpected)
    parts += [f"shape mismatches {shapes}"] * bool(shapes)
    if parts:
        raise InteropError(f"{what} does not match the config: " + "; ".join(parts))


def state_dict_from_lingua(
    sd: dict[str, torch.Tensor], config: AUNetConfig
) -> dict[str, torch.Tensor]:
    """Official ``HierarchicalTransformer`` state dict -> ours; constant buffers verified."""
    specs = key_map(config)
    _check_keys(sd, {s.official: s.shape for s in specs}, "official state dict")
    out = {}
    for s in specs:
        if s.ours is not None:
            out[s.ours] = sd[s.official]
            continue
        want = _official_buffers(*s.dims)[s.official.rsplit(".", 1)[1]]
        got = sd[s.official]
        same_kind = got.dtype.is_floating_point == want.dtype.is_floating_point
        if not (same_kind and torch.equal(got.cpu(), want.to(got.dtype))):
            raise InteropError(f"{s.official}: not the official constant {want.tolist()}")
    return out


def state_dict_to_lingua(
    sd: dict[str, torch.Tensor], config: AUNetConfig
) -> dict[str, torch.Tensor]:
    """Ours -> official state dict, with the non-parametric buffers regenerated as officially."""
    specs = key_map(config)
    _check_keys(sd, {s.ours: s.shape for s in specs if s.ours is not None}, "our state dict")
    out = {}
    for s in specs:
        if s.ours is not None:
            out[s.official] = sd[s.ours]
        else:
            out[s.official] = _official_buffers(*s.dims)[s.official.rsplit(".", 1)[1]]
    return out


# ---------------------------------------------------------------------------------------- files
def _consolidated_dir(path: str | os.PathLike) -> Path:
    """The official step dir or its ``consolidated/`` subdir -> the dir holding both files."""
    p = Path(path)
    for cand in (p, p / CONSOLIDATED_DIR):
        if (cand / CONSOLIDATED_FILE).is_file() and (cand / PARAMS_FILE).is_file():
            return cand
    if (p / ".metadata").is_file():
        raise InteropError(
            f"{p}: sharded (DCP) checkpoint; consolidate it first (lingua.checkpoint."
            "consolidate_checkpoints, or torch.distributed.checkpoint.format_utils."
            "dcp_to_torch_save into consolidated/consolidated.pth with params.json beside it)"
        )
    raise InteropError(f"{p}: no {CONSOLIDATED_FILE} + {PARAMS_FILE} here or in consolidated/")


def load_lingua_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> AUNet:
    """Official consolidated checkpoint directory -> our ``AUNet`` (float32, eval mode)."""
    ckpt = _consolidated_dir(path)
    config = config_from_lingua(ckpt / PARAMS_FILE)
    weights = ckpt / CONSOLIDATED_FILE
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickled objects beyond tensors
        raise InteropError(f"{weights}: cannot read ({type(e).__name__}: {e})") from None
    sd = obj.get("model") if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(sd, dict):
        raise InteropError(f"{weights}: expected {{'model': state_dict}}, got {type(obj).__name__}")
    try:
        ours = state_dict_from_lingua(sd, config)
    except InteropError as e:
        raise InteropError(f"{weights}: {e}") from None
    with torch.device("meta"):
        model = AUNet(config)
    ours = {k: v.float() if v.is_floating_point() else v for k, v in ours.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    return model.to(map_location).eval()


def save_lingua_checkpoint(model: AUNet, out_dir: str | os.PathLike, seq_len: int) -> Path:
    """Our model -> official ``consolidated.pth`` + ``params.json`` (what lingua's loaders read)."""
    params = config_to_lingua(model.config, seq_len)  # refuses before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params["distributed"] = {"model_dtype": "fp32"}  # read by the official generate loader
    sd = state_dict_to_lingua(model.state_dict(), model.config)
    torch.save({"model": {k: v.detach().cpu() for k, v in sd.items()}}, out / CONSOLIDATED_FILE)
    (out / PARAMS_FILE).write_text(json.dumps(params, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    """The converter's command line: a missing or damaged checkpoint is one line, ``error: ...``,
    and exit code 2 (``--debug`` or ``AUNET_DEBUG=1``: with its traceback), as the pipelines'."""
    ap = argparse.ArgumentParser(
        prog="python -m aunet.interop",
        description="Convert an official lingua AU-Net consolidated checkpoint to ours (or back).",
    )
    ap.add_argument("src", help="official step dir or consolidated/ dir (ours with --to-lingua)")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--to-lingua", action="store_true", help="convert ours -> official")
    ap.add_argument("--seq-len", type=int, help="data.seq_len for --to-lingua (default C_0)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    try:
        if args.to_lingua:
            model = load_pretrained(args.src)
            seq_len = args.seq_len or model.config.capacities[0]
            if seq_len < 1:
                ap.error("--seq-len is needed: the config's max_seqlens[0] is -1")
            print(save_lingua_checkpoint(model, args.out, seq_len))
        else:
            model = load_lingua_checkpoint(args.src)
            meta = {"source": "lingua", "path": str(Path(args.src).resolve())}
            print(save_pretrained(model, args.out, metadata=meta))
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        if args.debug or os.environ.get("AUNET_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        text = " ".join(str(e).split())  # torch's and YAML's messages run over several lines
        print(f"error: {text if len(text) <= 600 else text[:597] + '...'}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
