"""AU-Net: embed -> encoders (pool down) -> trunk -> decoders (upsample + skip) -> logits.

A config with one stage (``len(dimensions) == 1``) is a plain byte-level Transformer: the baseline
every comparison uses; with a tokenizer's ``vocab_size`` it is the BPE baseline (docs/design.md,
BPE baseline), the same blocks over token ids. Module names mirror the official
``HierarchicalTransformer`` so official state dicts load key for key (see ``aunet.interop``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from aunet.config import AUNetConfig
from aunet.layers import (
    CausalTransformer,
    RMSNorm,
    TransformerBlock,
    resolve_backend,
    trunc_normal_,
)
from aunet.loss import LossOutput, cross_entropy
from aunet.pooling import StagePlan, force_first, pooling_plan
from aunet.transitions import Transition


@dataclass
class ForwardOutput:
    """hidden (B, T, D_0): decoder-0 output before ``vocab_norm``; plans: one per transition."""

    hidden: torch.Tensor
    plans: list[StagePlan]

    def stage_tokens(self) -> list[int]:
        """Real positions processed per stage in this batch (stage 0 = bytes)."""
        B, T = self.hidden.shape[:2]
        return [B * T] + [int(p.counts.sum()) for p in self.plans]


class AUNet(nn.Module):
    def __init__(self, config: AUNetConfig) -> None:
        super().__init__()
        self.config = config
        c, K = config, config.num_stages
        stages = c.stages
        d0 = c.dimensions[0]
        self.tok_embeddings = nn.Embedding(c.vocab_size, d0)

        def stack(s: int, n_layers: int) -> CausalTransformer:
            st = stages[s]
            return CausalTransformer(
                n_layers=n_layers,
                dim=st.dim,
                head_dim=st.head_dim,
                n_kv_heads=c.kv_heads(s),
                hidden=c.ffn_hidden(st.dim),
                norm_eps=c.norm_eps,
                window=st.sliding_window,
                rope_theta=c.rope_theta,
            )

        self.encoders = nn.ModuleList(stack(s, stages[s].layers) for s in range(K))
        self.transitions = nn.ModuleList(
            Transition(
                c.dimensions[s],
                c.dimensions[s + 1],
                c.upsampling,
                c.upsampling_positions,
                c.norm_eps,
            )
            for s in range(K)
        )
        self.decoders = nn.ModuleList(stack(s, stages[s].layers) for s in range(K))
        self.trunk = stack(K, stages[K].layers)
        self.vocab_norm = RMSNorm(d0, c.norm_eps)
        self.vocab = nn.Linear(d0, c.vocab_size, bias=False)
        if c.lambda_level > 0:
            self.level_mask_norm = RMSNorm(2 * d0, c.norm_eps)
            self.level_mask = nn.Linear(2 * d0, K + 1, bias=False)
        self.attn_backend = "auto"
        self.init_weights()

    # ------------------------------------------------------------------ structure
    def blocks(self) -> Iterator[TransformerBlock]:
        """Every transformer block (the FSDP / activation-checkpointing units)."""
        for stack in [*self.encoders, *self.decoders, self.trunk]:
            yield from stack.layers

    def stage_blocks(self) -> Iterator[tuple[int, int, TransformerBlock]]:
        """(stage, index within its stack, block) for every block, in ``blocks()`` order; the
        per-stage settings (activation checkpointing) key on it."""
        K = self.config.num_stages
        for stacks in (self.encoders, self.decoders):
            for s, stack in enumerate(stacks):
                for i, block in enumerate(stack.layers):
                    yield s, i, block
        for i, block in enumerate(self.trunk.layers):
            yield K, i, block

    def set_attention(
        self, backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> str:
        """Pick the attention kernel once (``aunet.layers.resolve_backend``) and return its name,
        so the per-call dispatch stays a string compare inside compiled blocks."""
        self.attn_backend = resolve_backend(backend, device, dtype)
        return self.attn_backend

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init, plus the level head that the official code leaves empty.

        See docs/design.md (Blocks and initialisation).
        """
        c = self.config
        std = c.dimensions[0] ** -0.5
        trunc_normal_(self.tok_embeddings.weight, std)
        self.vocab_norm.reset_parameters()
        trunc_normal_(self.vocab.weight, std)
        for t in self.transitions:
            t.init_weights()
        for stack in [*self.encoders, *self.decoders, self.trunk]:
            stack.init_weights(c.init_base_std, c.init_std_factor)
        if c.lambda_level > 0:
            self.level_mask_norm.reset_parameters()
            trunc_normal_(self.level_mask.weight, (2 * c.dimensions[0]) ** -0.5)

    # ------------------------------------------------------------------ forward
    def plan(self, levels: torch.Tensor) -> list[StagePlan]:
        """levels (B, T) -> pooling plans; position 0 forced to the top level on a copy."""
        return pooling_plan(force_first(levels, self.config.num_stages), self.config.capacities)

    def features(self, tokens: torch.Tensor, levels: torch.Tensor) -> ForwardOutput:
        """tokens (B, T) int64 in [0, V), levels (B, T) int -> decoder-0 output (B, T, D_0)."""
        plans = self.plan(levels)
        x = self.tok_embeddings(tokens)
        skips = []
        for enc, trans, plan in zip(self.encoders, self.transitions, plans):
            x = enc(x, self.attn_backend)
            skips.append(x)
            x = trans.down(x, plan)
        x = self.trunk(x, self.attn_backend)
        for s in reversed(range(self.config.num_stages)):
            up = self.transitions[s].up(x, plans[s])
            x = skips[s] + up if self.config.skip_connections[s] else up
            x = self.decoders[s](x, self.attn_backend)
        return ForwardOutput(hidden=x, plans=plans)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D_0) -> logits (B, T, V), V = ``config.vocab_size`` (258 for bytes)."""
        return self.vocab(self.vocab_norm(hidden))

    def level_logits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Auxiliary head predicting the next byte's level from its embedding: (B, T, K+1)."""
        feats = torch.cat([hidden, self.tok_embeddings(targets)], dim=-1)
        return self.level_mask(self.level_mask_norm(feats))

    def forward(
        self,
        tokens: torch.Tensor,
        levels: torch.Tensor,
        targets: torch.Tensor | None = None,
        target_levels: torch.Tensor | None = None,
    ) -> torch.Tensor | LossOutput:
        """tokens (B, T) int64, levels (B, T) int -> logits (B, T, V).

        With ``targets`` (B, T) it returns the training ``LossOutput`` instead, computed inside
        ``forward`` so that FSDP's forward hooks cover every parameter the loss touches.
        """
        out = self.features(tokens, levels)
        logits = self.head(out.hidden)
        if targets is None:
            return logits
        ce = cross_entropy(logits, targets)
        loss, level_loss = ce, None
        lam = self.config.lambda_level
        if lam > 0:
            if target_levels is None:
                raise ValueError("lambda_level > 0 needs target_levels (the levels of the targets)")
            top = self.config.num_stages
            level_loss = cross_entropy(
                self.level_logits(out.hidden, targets), target_levels.clamp(max=top).long()
            )
            loss = ce + lam * level_loss
        return LossOutput(loss=loss, ce=ce, level_loss=level_loss, stage_tokens=out.stage_tokens())
