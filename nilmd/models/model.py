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

The maths has one home, here: `gate`, the skip sum (GatedLayer's skip half, summed in
WaveNILM.forward), `heads` and `power`, and `fold`/`folded_gate`, the same arithmetic rearranged
for serving. Every path runs these functions or restates them in one marked place:
  nilmd/models/fused.py        one building, incremental: fold, folded_gate, heads, power (its `_chunk`
                               adds the skip products; fold summed their biases);
  nilmd/models/fleet.py        many buildings: the same three, through FusedWaveNILM's buffers;
  nilmd/models/onnx_export.py  restates gate, the skip sum, heads and power as ONNX nodes (`build_group`,
                               each place marked "restates nilmd.models.model.<name>").
Change one and change those with it: tests/test_maths.py runs every path on random weights of two
architectures and holds them to this module's WaveNILM.
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


# -- the maths, written once ----------------------------------------------------------------------
def gate(filt: torch.Tensor, gate_logit: torch.Tensor) -> torch.Tensor:
    """A layer's gated activation: tanh(filter) * sigmoid(gate)."""
    return torch.tanh(filt) * torch.sigmoid(gate_logit)


def heads(skip: torch.Tensor, hidden, out) -> torch.Tensor:
    """The heads on the skip sum (consumed: its ReLU is in place): ReLU, `hidden`, ReLU, `out` -> the
    [mask, on] logits, in out's channel dimension. `hidden`, `out`: the 1x1 convolutions, as modules
    or as any callable with their weights (the serving paths' batched matmuls)."""
    return out(hidden(skip.relu_()).relu_())


def power(mask_probability: torch.Tensor, aggregate: torch.Tensor) -> torch.Tensor:
    """The power head: sigmoid(mask logit) x the aggregate's active power, never below 0 (so the
    appliance's power is never negative and never above the aggregate)."""
    return mask_probability * aggregate.clamp_min(0.0)


# Serving computes the gate as one sigmoid over [2 filter, gate]: tanh(f) = 2 sigmoid(2f) - 1, so
# (sigmoid(2f) - 1/2) sigmoid(g) = gate(f, g) / GATE_FOLD. fold() doubles the filter rows of each
# layer's conv and the out conv's weights; powers of two scale exactly. (torch 2.13's CPU tanh costs
# ~4x its sigmoid, measured on this project's AVX-512 box.)
GATE_FOLD = 2.0


def folded_gate(y: torch.Tensor, C: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2C] conv outputs on fold()'s weights, [2f, g] -> [..., C] gate(f, g) / GATE_FOLD (fold
    put GATE_FOLD in w_res and w_skip). Overwrites y."""
    s = y.sigmoid_()
    return torch.mul(s[..., :C].sub_(1.0 / GATE_FOLD), s[..., C:], out=out)


def fold(model: "WaveNILM") -> dict[str, torch.Tensor]:
    """One model's weights as the serving paths compute with them (float32, detached), as
    matrices for x @ W ([in, out]) of time-major activations [..., time, channels]:
      w_in [F, C], b_in [1, C]       the input conv with the input scales folded in;
      w_prev, w_cur [D, C, 2C]       each layer's conv taps t - dilation and t, b_conv [D, 1, 2C], the
                                     filter rows times GATE_FOLD (folded_gate);
      w_res, w_skip [D, C, C]        the out conv's residual and skip halves times GATE_FOLD,
      b_res [D, 1, C]                and the residual bias;
      b_skip [1, C]                  the skip sum's biases, summed once: the serving paths add only
                                     the products to it;
      w_h1 [C, H], b_h1 [1, H], w_h2 [H, 2], b_h2 [1, 2]: the heads' hidden and out convs."""
    C = model.config.channels
    rows = torch.cat([torch.full((C,), GATE_FOLD), torch.ones(C)])  # [filter rows, gate rows]

    def layers(get):
        return torch.stack([get(layer) for layer in model.layers])

    def matrix(conv: nn.Conv1d, tap: int = 0) -> torch.Tensor:
        return conv.weight[:, :, tap].T

    residual, skip = slice(0, C), slice(C, 2 * C)  # GatedLayer's out conv: residual half, then skip half
    weights = {
        "w_in": matrix(model.inp) * model.inv_scale.view(-1, 1),
        "b_in": model.inp.bias.view(1, C),
        "w_prev": layers(lambda l: matrix(l.conv, 0) * rows),
        "w_cur": layers(lambda l: matrix(l.conv, 1) * rows),
        "b_conv": layers(lambda l: (l.conv.bias * rows).view(1, 2 * C)),
        "w_res": layers(lambda l: GATE_FOLD * matrix(l.out)[:, residual]),
        "b_res": layers(lambda l: l.out.bias[residual].view(1, C)),
        "w_skip": layers(lambda l: GATE_FOLD * matrix(l.out)[:, skip]),
        "b_skip": sum(l.out.bias[skip] for l in model.layers).view(1, C),
        "w_h1": matrix(model.head.hidden),
        "b_h1": model.head.hidden.bias.view(1, -1),
        "w_h2": matrix(model.head.out),
        "b_h2": model.head.out.bias.view(1, 2),
    }
    return {k: v.detach().float() for k, v in weights.items()}


class GatedLayer(nn.Module):
    def __init__(self, channels: int, dilation: int, dropout: float):
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(channels, 2 * channels, kernel_size=2, dilation=dilation)
        self.out = nn.Conv1d(channels, 2 * channels, kernel_size=1)  # residual and skip at once
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        filt, gate_logit = self.conv(F.pad(x, (self.dilation, 0))).chunk(2, dim=1)
        z = self.dropout(gate(filt, gate_logit))
        residual, skip = self.out(z).chunk(2, dim=1)  # fold() splits the out conv the same way
        return x + residual, skip


class Head(nn.Sequential):
    """ReLU, `hidden` 1x1 conv, ReLU, `out` 1x1 conv to the two logits (mask, on): `heads` runs them.

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
        for layer in self.layers:  # the skip sum
            h, s = layer(h)
            skip = skip + s
        mask_logit, on_logit = heads(skip, self.head.hidden, self.head.out).unbind(dim=1)
        return power(torch.sigmoid(mask_logit), x[:, 0]), on_logit
