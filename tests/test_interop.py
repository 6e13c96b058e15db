"""Official lingua AU-Net configs and weights load into ours with the official logits (issue 11).

The golden numbers in ``tests/fixtures/lingua`` come from the official code (commit 437d680, see
``tests/fixtures/README.md``); nothing here imports or needs the official code.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from aunet.checkpoint import load_pretrained
from aunet.config import UPSAMPLING_TO_LINGUA, AUNetConfig
from aunet.interop import (
    InteropError,
    config_from_lingua,
    config_to_lingua,
    key_map,
    load_lingua_checkpoint,
    main,
    save_lingua_checkpoint,
    state_dict_from_lingua,
    state_dict_to_lingua,
)
from aunet.model import AUNet

FIX = Path(__file__).parent / "fixtures" / "lingua"
INDEX = json.loads((FIX / "index.json").read_text())
NAMES = [f["name"] for f in INDEX["fixtures"]]
# fp32, max abs. The fixtures' own fp32 logits are up to 2.9e-5 from the exact (float64) logits of
# the same weights (k3_multilinear_gqa), so a tolerance under that passes only on a CPU whose BLAS
# picks the fixture machine's kernels (1e-5 failed on AMD EPYC + MKL at 2.1e-5). 5e-5 is a few
# fp32 ulps of logits ~4 through the deepest fixture; a wrong weight moves them by > 1e-3.
LOGIT_TOL, LOSS_TOL = 5e-5, 1e-6


def fixture(name: str) -> dict:
    return torch.load(FIX / f"{name}.pt", weights_only=True)


def official_model(name: str) -> tuple[AUNet, dict]:
    fx = fixture(name)
    config = config_from_lingua(FIX / f"{name}.yaml")
    model = AUNet(config)
    model.load_state_dict(state_dict_from_lingua(fx["state_dict"], config), strict=True)
    return model.eval(), fx


def count_params(config: AUNetConfig) -> int:
    """aunet.flops.num_params where it exists, else numel summed over a meta-device model."""
    try:
        from aunet.flops import num_params
    except ImportError:  # pragma: no cover - flops.py is optional for this check
        with torch.device("meta"):
            return sum(p.numel() for p in AUNet(config).parameters())
    return num_params(config)


@pytest.fixture(autouse=True)
def one_thread():
    """The fixtures were computed on one thread; keep GEMM blocking identical."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("name", NAMES)
def test_official_logits_and_loss(name: str) -> None:
    model, fx = official_model(name)
    with torch.no_grad():
        logits = model(fx["tokens"], fx["levels"])
        out = model(fx["tokens"], fx["levels"], fx["targets"], fx["target_levels"])
    dl = (logits - fx["logits"]).abs().max().item()
    dce = abs(out.ce.item() - fx["loss"])
    msg = f"{name}: max |logit diff| {dl:.3e}, |loss diff| {dce:.3e}"
    if fx["mask_loss"] is not None:
        dml = abs(out.level_loss.item() - fx["mask_loss"])
        msg += f", |mask loss diff| {dml:.3e}"
        assert dml <= LOSS_TOL, msg
        lam = model.config.lambda_level
        assert abs(out.loss.item() - (fx["loss"] + lam * fx["mask_loss"])) <= 2 * LOSS_TOL
    else:
        assert out.level_loss is None
    print(msg)
    assert logits.dtype == torch.float32 and logits.shape == fx["logits"].shape
    assert dl <= LOGIT_TOL, msg
    with torch.no_grad():  # the math agrees, not just the rounding: exact logits, same bound
        exact = model.double()(fx["tokens"], fx["levels"])
    assert (exact - fx["logits"].double()).abs().max().item() <= LOGIT_TOL, msg
    model.float()
    assert dce <= LOSS_TOL, msg
    # the per-transition counts after capping equal the official nb_toks (batch totals)
    assert out.stage_tokens[1:] == fx["nb_toks"]


def test_comparison_can_fail() -> None:
    """A wrong norm weight (or a forgotten one) moves the logits far beyond the tolerance."""
    name = "k2_nonparam_multilinear"
    fx = fixture(name)
    config = config_from_lingua(FIX / f"{name}.yaml")
    for key in ("transitions.1.indexed_norm.weight", "vocab_norm.weight"):
        sd = dict(fx["state_dict"])
        sd[key] = torch.ones_like(sd[key])  # the init value the fixture deliberately moved
        model = AUNet(config)
        model.load_state_dict(state_dict_from_lingua(sd, config))
        with torch.no_grad():
            diff = (model.eval()(fx["tokens"], fx["levels"]) - fx["logits"]).abs().max().item()
        assert diff > 1e-3, key


# ---------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips(name: str) -> None:
    fx = fixture(name)
    config = config_from_lingua(FIX / f"{name}.yaml")
    ours = AUNet(config).state_dict()
    # the explicit map describes exactly our model's keys and shapes
    specs = {s.ours: s.shape for s in key_map(config) if s.ours is not None}
    assert specs == {k: tuple(v.shape) for k, v in ours.items()}
    # ours -> official -> ours is the identity
    back = state_dict_from_lingua(state_dict_to_lingua(ours, config), config)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    # official -> ours -> official reproduces the official dict, constant buffers included
    official = fx["state_dict"]
    again = state_dict_to_lingua(state_dict_from_lingua(official, config), config)
    assert again.keys() == official.keys()
    for k, v in official.items():
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k
    dropped = set(official) - set(state_dict_from_lingua(official, config))
    has_buffers = config.nonparametric and config.num_stages > 0
    assert bool(dropped) == has_buffers
    assert all(k.endswith(("features_weight", "expand_idx")) for k in dropped)


@pytest.mark.parametrize("name", NAMES)
def test_num_params_match_official(name: str) -> None:
    config = config_from_lingua(FIX / f"{name}.yaml")
    want = fixture(name)["num_params"]
    assert count_params(config) == want
    assert sum(p.numel() for p in AUNet(config).parameters()) == want


def test_key_errors_list_the_keys() -> None:
    fx = fixture("k2_nonparam")
    config = config_from_lingua(FIX / "k2_nonparam.yaml")
    sd = dict(fx["state_dict"])
    del sd["decoders.1.layers.0.ffn_norm.weight"], sd["transitions.0.expand_idx"]
    sd["transitions.0.trans_up.weight"] = torch.zeros(8, 16)
    with pytest.raises(InteropError) as e:
        state_dict_from_lingua(sd, config)
    msg = str(e.value)
    assert "missing keys ['decoders.1.layers.0.ffn_norm.weight', 'transitions.0.expand_idx']" in msg
    assert "unexpected keys ['transitions.0.trans_up.weight']" in msg

    sd = dict(fx["state_dict"])
    sd["vocab.weight"] = sd["vocab.weight"][:, :4]
    with pytest.raises(
        InteropError, match=r"vocab\.weight: checkpoint \(258, 4\) vs config \(258, 8\)"
    ):
        state_dict_from_lingua(sd, config)

    sd = dict(fx["state_dict"])
    sd["transitions.0.features_weight"] = sd["transitions.0.features_weight"].flip(0)
    with pytest.raises(InteropError, match=r"transitions\.0\.features_weight: not the official"):
        state_dict_from_lingua(sd, config)

    ours = state_dict_from_lingua(fx["state_dict"], config)
    ours.pop("tok_embeddings.weight")
    with pytest.raises(InteropError, match=r"missing keys \['tok_embeddings\.weight'\]"):
        state_dict_to_lingua(ours, config)


# ---------------------------------------------------------------------------------------- configs
def load_yaml(name: str) -> dict:
    return yaml.safe_load((FIX / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name: str) -> None:
    raw = load_yaml(name)
    config = config_from_lingua(raw)
    assert config.pooling_type == raw["model"]["pooling_type"]
    assert config.capacities[0] == raw["data"]["seq_len"]  # -1 -> data.seq_len, as officially
    assert config.split_strategy == raw["data"]["regex"]["strategy"]
    exported = config_to_lingua(config, raw["data"]["seq_len"])
    assert config_from_lingua(exported) == config
    assert config_from_lingua(json.loads(json.dumps(exported))) == config  # params.json form


def test_config_round_trip_block_options() -> None:
    config = AUNetConfig(
        dimensions=[8, 16],
        layers=[1, 2],
        head_dims=[4, 8],
        sliding_windows=[5, None],
        max_seqlens=[32, 12],
        residuals=[False],
        n_kv_heads=1,
        rope_theta=123.0,
        multiple_of=8,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-6,
        init_base_std=0.02,
        init_std_factor="current_depth",
        upsampling="nonparam_repeat",
        lambda_level=0.25,
        strategy={"word2": "2@1"},
        seed=7,
    )
    assert config_from_lingua(config_to_lingua(config, 32)) == config
    for up, pooling in UPSAMPLING_TO_LINGUA.items():
        c = config.replace(upsampling=up)
        lingua = config_to_lingua(c, 32)
        assert lingua["model"]["pooling_type"] == pooling
        assert config_from_lingua(lingua) == c


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("script1", "1@1 han=2", "script"),
        ("entropy1", "t=4 order=3 model=eJzt sha256=0123456789abcdef", "entropy"),
    ],
)
def test_export_refuses_script_and_entropy_strategies(
    key: str, value: str, kind: str, tmp_path: Path
) -> None:
    """The official format splits by word, pretok and punct only (docs/design.md, Splitting)."""
    config = AUNetConfig(
        dimensions=[8, 16], layers=[1, 1], head_dims=[4, 8], max_seqlens=[32, 12]
    ).replace(strategy={key: value})
    with pytest.raises(InteropError, match=f"strategy.{key}: a {kind} split strategy cannot"):
        config_to_lingua(config, 32)
    with pytest.raises(InteropError, match=f"{kind} split strategy"):
        save_lingua_checkpoint(AUNet(config), tmp_path / "out", 32)
    assert not (tmp_path / "out").exists()


def test_official_2b_configs_param_counts() -> None:
    """The shipped 2B configs (values transcribed) give the official parameter totals
    (docs/flops.md, Reference numbers)."""

    def cfg(dims, layers, heads, caps, strat):
        model = dict(
            dimensions=dims, layers=layers, head_dims=heads, residuals=[True] * (len(dims) - 1)
        )
        model.update(sliding_windows=[512] + [4096] * (len(dims) - 1), max_seqlens=caps)
        model.update(block={"rope_theta": 500000.0, "multiple_of": 256}, lambda_level=0.0)
        model.update(pooling_type="simple_indexed_matmul")
        data = {"seq_len": 8192, "tokenizer": {"name": "bytes"}, "regex": {"strategy": strat}}
        return config_from_lingua({"model": model, "data": data})

    one = cfg([512, 2048], [3, 25], [64, 128], [-1, 3200], {"word1": "1@1"})
    two = cfg(
        [512, 2048, 3456],
        [3, 6, 12],
        [64, 128, 128],
        [-1, 1600, 928],
        {"word1": "1@1", "word2": "2@1"},
    )
    assert count_params(one) == 1_324_203_008
    assert count_params(two) == 2_503_624_064
    assert two.capacities == [8192, 1600, 928]


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c["model"].update(pooling_type="foo"), "model.pooling_type: cannot map 'foo'"),
        (lambda c: c["model"].update(pooling_type="Simple_Repeat"), "model.pooling_type"),
        (lambda c: c["data"]["tokenizer"].update(name="sp"), "data.tokenizer.name: 'sp'"),
        (lambda c: c["model"]["block"].update(qk_norm=True), "model.block.qk_norm"),
        (lambda c: c["model"]["block"].update(n_heads=3), "model.block.n_heads"),
        (lambda c: c["model"].update(norm_eps=1e-6), "model.norm_eps"),
        (lambda c: c["model"].update(vocab_size=32000), "model.vocab_size"),
        (lambda c: c["model"].update(up_attn=True), "model.up_attn: unknown key"),
        (lambda c: c["data"].pop("seq_len"), "data.seq_len"),
        (lambda c: c["data"].pop("regex"), "data.regex.strategy"),
        (
            lambda c: c["data"]["regex"].update(strategy={"script1": "1@1"}),
            "data.regex.strategy.script1: a script split strategy cannot be expressed",
        ),
        (
            lambda c: c["model"].update(residuals=[]) or c["model"].update(head_dims=[8, 6]),
            "model.head_dims[1]",
        ),
        (lambda c: c["model"]["block"].update(n_kv_heads=3), "model.block.n_kv_heads"),
        (lambda c: c["model"].update(max_seqlens=[32, 12]), "model.max_seqlens[0]: 32 != data"),
        (lambda c: c["model"].update(max_seqlens=[-1, -1]), "model.max_seqlens[1]: expected"),
    ],
)
def test_config_errors_name_the_key(edit, key: str) -> None:
    raw = copy.deepcopy(load_yaml("k1_multilinear"))
    edit(raw)
    with pytest.raises(InteropError) as e:
        config_from_lingua(raw)
    assert key in str(e.value)


def test_harmless_block_placeholders_are_ignored() -> None:
    raw = load_yaml("k1_multilinear")
    raw["model"]["block"].update(dim=512, n_layers=8, head_dim=None, n_heads=None, max_seqlen=1024)
    assert config_from_lingua(raw) == config_from_lingua(load_yaml("k1_multilinear"))
    raw["model"]["block"]["n_heads"] = 2  # 16/8 = 32/16 = 2 heads at every stage: same model
    assert config_from_lingua(raw) == config_from_lingua(load_yaml("k1_multilinear"))


# ---------------------------------------------------------------------------------------- files
def official_params_json(name: str) -> dict:
    """params.json as the official train.py dumps it: resolved TrainArgs, -1 replaced."""
    raw = load_yaml(name)
    model, data = raw["model"], raw["data"]
    block = dict(
        dim=512,
        n_layers=8,
        head_dim=None,
        n_heads=None,
        n_kv_heads=None,
        ffn_dim_multiplier=None,
        multiple_of=256,
        norm_eps=1e-5,
        rope_theta=10000.0,
        init_base_std=None,
        init_std_factor="disabled",
        max_seqlen=1024,
    )
    block.update(model["block"])
    caps = list(model["max_seqlens"])
    caps[0] = data["seq_len"] if caps[0] < 0 else caps[0]
    model = {**model, "block": block, "max_seqlens": caps, "vocab_size": 258, "norm_eps": 1e-5}
    data = {**data, "root_dir": "/data", "sources": {"dclm": 1.0}, "seed": 42}
    data["tokenizer"] = {"name": "bytes", "path": None}
    return {
        "name": name,
        "seed": 777,
        "model": model,
        "data": data,
        "distributed": {"model_dtype": "bf16"},
        "steps": 10,
    }


def write_official_checkpoint(root: Path, name: str) -> Path:
    fx = fixture(name)
    step = root / "checkpoints" / "0000000010"
    cons = step / "consolidated"
    cons.mkdir(parents=True)
    optim = {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}]}
    torch.save({"model": fx["state_dict"], "optim": optim}, cons / "consolidated.pth")
    (cons / "params.json").write_text(json.dumps(official_params_json(name)))
    (step / "params.json").write_text(json.dumps(official_params_json(name)))
    return step


def logits_of(model: AUNet, fx: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(fx["tokens"], fx["levels"])


@pytest.mark.parametrize("name", ["k3_multilinear_gqa", "k2_nonparam"])
def test_load_consolidated_checkpoint_and_cli(tmp_path: Path, name: str) -> None:
    fx = fixture(name)
    step = write_official_checkpoint(tmp_path, name)
    for where in (step, step / "consolidated"):
        model = load_lingua_checkpoint(where)
        assert model.config == config_from_lingua(FIX / f"{name}.yaml")
        assert (logits_of(model, fx) - fx["logits"]).abs().max().item() <= LOGIT_TOL

    ours = tmp_path / "ours"
    main([str(step), str(ours)])
    model = load_pretrained(ours)
    assert (logits_of(model, fx) - fx["logits"]).abs().max().item() <= LOGIT_TOL

    back = tmp_path / "back"
    main([str(ours), str(back), "--to-lingua"])
    sd = torch.load(back / "consolidated.pth", weights_only=True)["model"]
    assert sd.keys() == fx["state_dict"].keys()
    assert all(torch.equal(sd[k], v) for k, v in fx["state_dict"].items())
    again = load_lingua_checkpoint(back)
    assert again.config == model.config
    assert torch.equal(logits_of(again, fx), logits_of(model, fx))


def test_checkpoint_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(InteropError, match="no consolidated.pth"):
        load_lingua_checkpoint(tmp_path)
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2  # one line, no traceback
    (tmp_path / ".metadata").write_bytes(b"")
    with pytest.raises(InteropError, match="sharded"):
        load_lingua_checkpoint(tmp_path)
    step = write_official_checkpoint(tmp_path / "x", "k1_multilinear")
    sd = fixture("k1_multilinear")["state_dict"]
    sd.pop("trunk.layers.0.ffn_norm.weight")
    torch.save({"model": sd}, step / "consolidated" / "consolidated.pth")
    with pytest.raises(InteropError, match=r"consolidated\.pth: .*missing keys \['trunk"):
        load_lingua_checkpoint(step)


def test_bf16_checkpoint_loads_as_float32(tmp_path: Path) -> None:
    """Official weights saved in bf16 (buffers stay as built) load as float32 values."""
    step = write_official_checkpoint(tmp_path, "k2_nonparam_multilinear")
    sd = fixture("k2_nonparam_multilinear")["state_dict"]
    half = {
        k: v if k.endswith(("features_weight", "expand_idx")) else v.bfloat16()
        for k, v in sd.items()
    }
    half["transitions.0.features_weight"] = half["transitions.0.features_weight"].bfloat16()
    torch.save({"model": half}, step / "consolidated" / "consolidated.pth")
    model = load_lingua_checkpoint(step)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, half[k].float()), k
