"""Transformer backbone (nanoGPT-style blocks, bidirectional attention).

Past slots and future known slots become one token sequence of L + H tokens (each embedded
with its own linear map plus a learned position embedding). Everything in it is known at
prediction time, so attention is bidirectional: a future token can look at the meal
announced two slots later and at the whole history. The H future tokens' outputs are the
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
        self.embed_past = nn.Linear(cfg.past_features, cfg.d_model)
        self.embed_known = nn.Linear(cfg.known_features, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.past_slots + cfg.horizon_slots, cfg.d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.d_model = cfg.d_model

    def forward(self, past: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """past [B, L, F_past], known [B, H, F_known] -> seq [B, H, D], ctx [B, D]."""
        L = self.cfg.past_slots
        x = torch.cat([self.embed_past(past), self.embed_known(known)], dim=1)  # [B, L+H, D]
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)  # [B, L+H, D]
        return x[:, L:], x[:, L - 1]  # [B, H, D], [B, D]
