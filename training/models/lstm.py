"""LSTM encoder–decoder backbone.

The encoder reads the past window (glucose, insulin, carbs, IOB, COB, time of day, the
observed mask); its final state seeds a decoder that walks the H future slots reading only
the known future inputs the free part may see (announced carbs, time of day). The decoder
outputs one feature vector per horizon step, so all horizons come out at once (direct
multi-horizon, no feeding back of predictions, hence no error accumulation).

Small on purpose: hidden 64 and one layer keep a batch-1 forecast well under a millisecond
in onnxruntime on one core, which is what the 5-minute MPC loop needs when it scores many
insulin plans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LSTMConfig:
    past_features: int
    known_features: int
    hidden: int = 64
    layers: int = 1
    dropout: float = 0.0
    # Past features that are static per person (the therapy profile, the daily dose): read at
    # the origin, they set the encoder's initial state, so the person conditions every step
    # rather than being one more input column. () = start from zeros.
    static_idx: tuple[int, ...] = ()


class LSTMBackbone(nn.Module):
    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        drop = cfg.dropout if cfg.layers > 1 else 0.0  # nn.LSTM warns on dropout with 1 layer
        self.encoder = nn.LSTM(
            cfg.past_features, cfg.hidden, cfg.layers, batch_first=True, dropout=drop
        )
        self.decoder = nn.LSTM(
            cfg.known_features, cfg.hidden, cfg.layers, batch_first=True, dropout=drop
        )
        self.d_model = cfg.hidden
        self.register_buffer("static_idx", torch.tensor(cfg.static_idx, dtype=torch.long))
        self.static = (
            nn.Linear(len(cfg.static_idx), cfg.layers * cfg.hidden) if cfg.static_idx else None
        )

    def forward(self, past: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """past [B, L, F_past], known [B, H, F_known] -> seq [B, H, D], ctx [B, D]."""
        if self.static is None:
            _, (h, c) = self.encoder(past)  # h, c: [layers, B, D]
        else:
            B, n, D = past.shape[0], self.cfg.layers, self.cfg.hidden
            s = past[:, -1].index_select(1, self.static_idx)  # [B, S] at the origin
            h0 = torch.tanh(self.static(s)).view(B, n, D).transpose(0, 1).contiguous()  # [n, B, D]
            _, (h, c) = self.encoder(past, (h0, torch.zeros_like(h0)))  # h, c: [layers, B, D]
        seq, _ = self.decoder(known, (h, c))  # [B, H, D]
        ctx = h[-1]  # [B, D]: the top layer's summary of the past
        return seq, ctx
