"""Transformer backbone (nanoGPT-style blocks, bidirectional attention).

Past slots (or patches of `patch` consecutive past slots) and future known slots become one
token sequence of L / patch + H tokens (each embedded with its own linear map plus a learned
position embedding). Everything in it is known at prediction time, so attention is
bidirectional: a future token can look at the meal announced two slots later and at the
whole history. The H future tokens' outputs are the
per-horizon features; the last past token's output is the context for the insulin gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    past_features: int
    known_features: int
    past_slots: int
    horizon_slots: int
    d_model: int = 32
    heads: int = 4
    layers: int = 2
    ff_mult: int = 2
    dropout: float = 0.0
    patch: int = 1  # past slots per past token (1 = one token per slot)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 × [B, T, D]
        q = q.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # [B, nh, T, hd]
        k = k.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # [B, nh, T, hd]
        v = v.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # [B, nh, T, hd]
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )  # [B, nh, T, hd]
        y = y.transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.ff_mult * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.ff_mult * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # pre-norm residuals train stably without warm-up
        return x + self.mlp(self.ln2(x))


class TransformerBackbone(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.patch < 1 or cfg.past_slots % cfg.patch:
            raise ValueError(
                f"transformer.patch = {cfg.patch} must divide the {cfg.past_slots} past slots"
            )
        # Past tokens are patches of `patch` consecutive slots (PatchTST style): fewer, less
        # noisy tokens, e.g. one per 15-minute reading of a Libre sensor on the 5-minute grid.
        self.n_past = cfg.past_slots // cfg.patch
        self.embed_past = nn.Linear(cfg.patch * cfg.past_features, cfg.d_model)
        self.embed_known = nn.Linear(cfg.known_features, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(self.n_past + cfg.horizon_slots, cfg.d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.d_model = cfg.d_model

    def forward(self, past: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """past [B, L, F_past], known [B, H, F_known] -> seq [B, H, D], ctx [B, D]."""
        B, N = past.shape[0], self.n_past
        patches = past.reshape(B, N, -1)  # [B, L/patch, patch·F_past], slots in time order
        x = torch.cat([self.embed_past(patches), self.embed_known(known)], dim=1)  # [B, N+H, D]
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)  # [B, N+H, D]
        return x[:, N:], x[:, N - 1]  # [B, H, D], [B, D]
