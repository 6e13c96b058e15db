"""The GPU path checked on CPU: attention dispatch (FlexAttention's eager path against SDPA and a
float64 naive loop), static-shape padding and recompiles, activation checkpointing, bf16, and the
memory estimator. The GPU figures themselves come from tests/gpu/run.sh (docs/performance.md)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from reference import attention_ref

from aunet.config import AUNetConfig
from aunet.layers import attention, resolve_backend
from aunet.memory import activation_bytes, measure_saved_bytes, training_memory
from aunet.model import AUNet
from aunet.optim import build_optimizer
from aunet.parallel import shard


def small_config(**kw) -> AUNetConfig:
    base = dict(
        dimensions=[16, 32],
        layers=[1, 2],
        head_dims=[8, 8],
        sliding_windows=[8, 16],
        max_seqlens=[-1, -1],
        multiple_of=16,
    )
    base.update(kw)
    return AUNetConfig(**base)


def batch(B: int, T: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bytes with random levels (boundaries of every level at varying density)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (B, T), generator=g)
    levels = torch.randint(0, K + 1, (B, T), generator=g)
    return tokens, levels


# ---------------------------------------------------------------------------------------- attention
def test_flex_equals_sdpa_and_naive():
    """Flex (eager reference path, float64) == the masked SDPA path == naive loops; lengths off
    Flex's 128-block grid, a window inside one block and one spanning blocks."""
    g = torch.Generator().manual_seed(3)
    for length, window in ((37, 5), (150, 129)):
        q, k, v = (torch.randn(1, length, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
        ref = attention_ref(q, k, v, window)
        flex = attention(q, k, v, window, backend="flex")
        sdpa = attention(q, k, v, window, backend="sdpa")
        torch.testing.assert_close(flex, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(sdpa, ref, atol=1e-12, rtol=1e-12)


def test_backend_resolution_and_model_logits():
    """auto is SDPA on CPU; a whole model gives the same float64 logits with Flex and SDPA."""
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_backend("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match="attention"):
        resolve_backend("xformers", "cpu")
    torch.manual_seed(0)
    model = AUNet(small_config()).double()
    tokens, levels = batch(2, 48, 1, seed=1)
    with torch.no_grad():  # Flex has no CPU backward; its gradients are checked on GPU only
        assert model.set_attention("sdpa", "cpu") == "sdpa"
        a = model(tokens, levels)
        assert model.set_attention("flex", "cpu") == "flex"
        b = model(tokens, levels)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------ activation checkpointing
def test_activation_checkpointing_per_stage_gradients_equal():
    """Recomputing blocks (every block of stage 0, every second of the trunk) changes no gradient
    (float64: the recompute runs the same ops on the same inputs)."""
    torch.manual_seed(0)
    plain = AUNet(small_config(layers=[2, 3])).double()
    ckpt = shard(copy.deepcopy(plain), False, activation_checkpointing=["blocks", "selective"])
    tokens, levels = batch(2, 40, 1, seed=2)
    for m in (plain, ckpt):
        m(tokens, levels, targets=tokens).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12, msg=name)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        shard(AUNet(small_config()), False, activation_checkpointing=["blocks"])


# ------------------------------------------------------------------------ static shapes, compile
def test_padding_to_capacity_keeps_logits_and_compiles_once_per_shape():
    """A capped stage runs at its capacity: logits equal the unpadded model's (padding sits after
    the real positions, causal attention hides it), and compiled blocks see one shape per stage
    over batches with different pooled lengths; an uncapped stage recompiles instead."""
    T = 48
    torch.manual_seed(0)
    loose = AUNet(small_config()).double()
    padded = AUNet(small_config(max_seqlens=[-1, T])).double()
    padded.load_state_dict(loose.state_dict())
    batches = [batch(2, T, 1, seed=s) for s in range(3)]
    lengths = set()
    with torch.no_grad():
        for tokens, levels in batches:
            lengths.add(loose.plan(levels)[0].length)
            assert padded.plan(levels)[0].length == T
            torch.testing.assert_close(
                loose(tokens, levels), padded(tokens, levels), atol=1e-12, rtol=1e-12
            )
    assert len(lengths) > 1  # the batches really pool to different lengths

    def compiles(model: AUNet) -> int:
        graphs = []

        def backend(gm, example_inputs):  # noqa: ANN001, ANN202 - dynamo backend signature
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        shard(model, False, compile=True, compile_backend=backend)
        with torch.no_grad():
            for tokens, levels in batches:
                model(tokens, levels)
        return len(graphs)

    assert compiles(padded) <= 2  # stage 0 at T, stage 1 at capacity T: one graph per shape
    assert compiles(loose) > 2  # pooled length changes per batch: the failure this prevents


# ---------------------------------------------------------------------------------------- bf16
def test_bf16_fsdp_forward_backward_close_to_fp32(tmp_path):
    """FSDP2 with the bf16 policy (one gloo rank in this process) against plain fp32.

    Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per op); through two
    stages of blocks the loss agrees to ~1e-2 relative, and each gradient points the same way
    (cosine > 0.99) with a norm within 5%. Gradients are reduced in fp32 into fp32 shards."""
    import torch.distributed as dist

    torch.manual_seed(0)
    ref = AUNet(small_config())
    bf = copy.deepcopy(ref)
    tokens, levels = batch(2, 64, 1, seed=5)
    ref(tokens, levels, targets=tokens).loss.backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        shard(bf, True)
        out = bf(tokens, levels, targets=tokens)
        out.loss.backward()
        ref_loss = float(ref(tokens, levels, targets=tokens).loss)
        assert 0 < abs(float(out.loss) - ref_loss) / ref_loss < 1e-2  # really bf16, and close
        for (name, a), b in zip(ref.named_parameters(), bf.parameters()):
            g = b.grad.full_tensor()
            assert g.dtype == torch.float32 and b.dtype == torch.float32, name  # fp32 masters
            cos = torch.nn.functional.cosine_similarity(a.grad.flatten(), g.flatten(), dim=0)
            assert cos > 0.99, (name, float(cos))
            assert abs(g.norm() / a.grad.norm() - 1) < 0.05, name
        with torch.no_grad():
            assert bf(tokens, levels).dtype == torch.bfloat16  # the compute ran in bf16
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- memory
def test_memory_estimate_against_measured():
    """Parameters, gradients and AdamW state exactly as allocated after a real step; saved
    activations within 20% of what autograd saves, for a byte Transformer and an AU-Net 2, fp32
    and bf16 autocast; checkpointing reduces the estimate."""
    for cfg in (
        AUNetConfig(dimensions=[64], layers=[3], head_dims=[16], sliding_windows=[32]),
        small_config(dimensions=[64, 128], head_dims=[16, 32], max_seqlens=[-1, 64]),
    ):
        torch.manual_seed(0)
        model = AUNet(cfg)
        tokens, levels = batch(2, 128, cfg.num_stages, seed=7)
        stage_tokens = [p.length for p in model.plan(levels)]
        for dtype in ("float32", "bfloat16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                fwd = functools.partial(
                    lambda m, t, lv: m(t, lv, targets=t).loss, model, tokens, levels
                )
                loss, saved = measure_saved_bytes(fwd, exclude=model.parameters())
            est = activation_bytes(cfg, 128, 2, dtype, stage_tokens=stage_tokens)
            assert 0.8 < est / saved < 1.2, (cfg.dimensions, dtype, est, saved)
        loss.backward()
        opt = build_optimizer(model, 1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
        opt.step()
        m = training_memory(cfg, 128, 2, "float32", stage_tokens=stage_tokens)
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        assert m.params == nbytes(model.parameters())
        assert m.grads == nbytes(p.grad for p in model.parameters())
        assert m.optimizer == nbytes(t for st in opt.state.values() for t in st.values())
        W = 4
        sharded = training_memory(cfg, 128, 2, "bfloat16", world_size=W)
        assert sharded.optimizer == m.optimizer / W and sharded.grads == m.grads / W
        assert sharded.params == m.params / W + m.params / 2  # fp32 shards + gathered bf16 copy
        full = activation_bytes(cfg, 128, 2)
        assert activation_bytes(cfg, 128, 2, activation_checkpointing="blocks") < full / 2


@pytest.mark.slow  # compiles two models (4-10 s on a loaded 2-core machine)
def test_compiled_memory_estimate_against_measured():
    """Compiled blocks (AOTAutograd's min-cut partitioner, inductor's, without its codegen) save
    what ``compiled_block_activation_bytes`` counts, within 20%, and less than eager: a byte
    Transformer and an AU-Net 2 in bf16 autocast (docs/performance.md, Memory)."""
    for cfg, T in (
        (AUNetConfig(dimensions=[64], layers=[2], head_dims=[16], sliding_windows=[32]), 128),
        (small_config(dimensions=[64, 128], head_dims=[16, 32], max_seqlens=[128, 64]), 128),
    ):
        torch.manual_seed(0)
        model = AUNet(cfg)
        model.set_attention("sdpa", torch.device("cpu"), torch.bfloat16)
        shard(model, False, compile=True, compile_backend="aot_eager_decomp_partition")
        tokens, levels = batch(3, T, cfg.num_stages, seed=7)
        stage_tokens = [float(cap) for cap in cfg.capacities[1:]]  # compiled: at capacity
        for _ in range(2):  # the first call compiles; the second is measured
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fwd = functools.partial(
                    lambda m, t, lv: m(t, lv, targets=t).loss, model, tokens, levels
                )
                loss, saved = measure_saved_bytes(fwd, exclude=model.parameters())
            loss.backward()
        # bf16 casts of the matrices are saved too: the compute copy, counted with parameters;
        # SDPA's (L, L) boolean-as-bf16 mask per stage is a CPU-path constant, not an activation
        casts = sum(2 * p.numel() for p in model.parameters() if p.dim() == 2)
        masks = sum(2 * int(L) ** 2 for L in [T, *stage_tokens])
        acts = saved - casts - masks
        est = activation_bytes(cfg, T, 3, "bfloat16", stage_tokens=stage_tokens, compiled=True)
        eager = activation_bytes(cfg, T, 3, "bfloat16", stage_tokens=stage_tokens)
        assert 0.8 < est / acts < 1.2, (cfg.dimensions, est, acts, saved)
        assert est < 0.85 * eager


def test_memory_cli_prints_tables_and_rejects_bad_specs(capsys):
    """``python -m pipelines.memory`` on the shipped study spec (a study's variants are tables
    too) and on a bad override: one line, exit code 2."""
    from pipelines.memory import main

    assert main(["experiments/scaling/paper.yaml", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("scaling-paper", "byte", "aunet2", "aunet3"):
        assert f"| {label}: training, bfloat16, FSDP x16, 2 x 8192 bytes" in out
    acts = {}
    for compiled in ("false", "true"):  # compiled blocks: the smaller compiled activation model
        assert main(["experiments/quickstart.yaml", f"train.compile={compiled}"]) == 0
        out = capsys.readouterr().out
        assert ("compiled blocks" in out) == (compiled == "true")
        acts[compiled] = float(out.split("| activations | ")[1].split(" |")[0])
    assert 0 < acts["true"] < 0.85 * acts["false"], acts
    assert main(["experiments/quickstart.yaml", "train.activation_checkpointing=[blocks]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "activation_checkpointing" in err


def test_gpu_bench_imports_and_refuses_cpu_without_smoke(capsys):
    """tests/gpu/bench.py stays importable without Ray/MLflow; without CUDA and without --smoke it
    stops with exit code 2 (the smoke run itself takes about a minute: run it by hand)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "gpu" / "bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    source = path.read_text()
    assert "import ray" not in source and "mlflow" not in source and "pipelines" not in source
    if not torch.cuda.is_available():
        assert bench.main([]) == 2
        assert "--smoke" in capsys.readouterr().err


def test_gpu_kernel_profile_families_and_cpu_refusal(capsys):
    """tests/gpu/kernels.py files each kernel under one family (the MFU breakdown in
    docs/performance.md is read from these) and, like the bench, refuses CPU without --smoke."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "gpu" / "kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels", path)
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    assert "import ray" not in path.read_text() and "mlflow" not in path.read_text()
    names = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
        "triton_tem_fused_flex_attention_backward_1": "attention",
        "triton_poi_fused__unsafe_view_mul_silu_silu_backward_view_1": "fused pointwise (triton)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOpti": "optimizer",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>": (
            "copy/cast/fill"
        ),
        "void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel": "gather/sort/scan",
        "some_unknown_kernel": "other",
    }
    assert {n: kernels.family(n) for n in names} == names
    if not torch.cuda.is_available():
        assert kernels.main([]) == 2
        assert "--smoke" in capsys.readouterr().err
