"""WaveNILM v3: one appliance's causal, gated, dilated 1-D CNN (docs/CONTRACT.md §8.4).

WaveNILM (Harell, Makonin & Bajić, ICASSP 2019) with three changes:
  * the gate is real: tanh(filter) * sigmoid(gate) (the reference code computes the sigmoid and
    then drops it);
  * residual connections and dilations 1, 2, ..., 2**(depth-1), so depth 10 sees 1024 samples
    (17 minutes at 1 Hz) and still fits a 1536-sample window;
  * two heads: power = sigmoid(mask) * aggregate active power (never negative, never above the
    aggregate), and an on/off logit.
Input: [batch, features, time] in physical units (nilmd.features); the model divides by the fixed
power-of-two scales itself, so callers never scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class WaveNILMConfig:
    n_features: int = 5
    channels: int = 32
    depth: int = 10  # receptive field = 2**depth samples
    head_channels: int = 32
    dropout: float = 0.0

    @property
    def receptive_field(self) -> int:
        return 2**self.depth


class GatedLayer(nn.Module):
    def __init__(self, channels: int, dilation: int, dropout: float):
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(channels, 2 * channels, kernel_size=2, dilation=dilation)
        self.out = nn.Conv1d(channels, 2 * channels, kernel_size=1)  # residual and skip at once
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        filt, gate = self.conv(F.pad(x, (self.dilation, 0))).chunk(2, dim=1)
        z = self.dropout(torch.tanh(filt) * torch.sigmoid(gate))
        residual, skip = self.out(z).chunk(2, dim=1)
        return x + residual, skip


class Head(nn.Sequential):
    """ReLU, `hidden` 1x1 conv, ReLU, `out` 1x1 conv to the two logits (mask, on).

    An nn.Sequential, so the weights keep the names every checkpoint has (`head.1.*` for hidden,
    `head.3.*` for out); code outside reads the convolutions by these names, never by position."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__(
            nn.ReLU(),
            nn.Conv1d(channels, head_channels, kernel_size=1),
            nn.ReLU(),
            nn.Conv1d(head_channels, 2, kernel_size=1),
        )

    @property
    def hidden(self) -> nn.Conv1d:
        return self[1]

    @property
    def out(self) -> nn.Conv1d:
        return self[3]


class WaveNILM(nn.Module):
    def __init__(self, config: WaveNILMConfig, scales):
        super().__init__()
        self.config = config
        inv = 1.0 / torch.as_tensor(scales, dtype=torch.float32)
        self.register_buffer("inv_scale", inv.view(1, config.n_features, 1), persistent=False)
        self.inp = nn.Conv1d(config.n_features, config.channels, kernel_size=1)
        self.layers = nn.ModuleList(
            GatedLayer(config.channels, 2**i, config.dropout) for i in range(config.depth)
        )
        self.head = Head(config.channels, config.head_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, F, T] -> (power in W [B, T], on/off logit [B, T]); output t sees inputs <= t."""
        h = self.inp(x * self.inv_scale)
        skip = 0
        for layer in self.layers:
            h, s = layer(h)
            skip = skip + s
        mask_logit, on_logit = self.head(skip).unbind(dim=1)
        power = torch.sigmoid(mask_logit) * x[:, 0].clamp_min(0.0)
        return power, on_logit
