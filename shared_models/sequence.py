"""Building blocks shared by the speech and text models."""

from __future__ import annotations

import torch
from opacus.layers import DPGRU, DPLSTM
from torch import nn

RECURRENT_CELLS = {"lstm": DPLSTM, "gru": DPGRU}
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def activation_layer(name: str) -> nn.Module:
    """nn.Tanh or nn.ReLU. Raises ValueError for any other name.

    tanh is the default: bounded activations keep per-sample gradient norms even across
    examples, so clipping discards less signal (Papernot et al., AAAI 2021, "Tempered
    Sigmoid Activations for Deep Learning with Differential Privacy"). Measured here on
    PneumoniaMNIST, DP-SGD noise 0.8, 3 epochs: tanh 0.865 accuracy vs ReLU 0.625 (all
    predictions the majority class).
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class ConvBlock1d(nn.Module):
    """Conv1d -> GroupNorm -> activation -> MaxPool over (B, C, T); T may be any length >= 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, activation: str = "tanh") -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(8, out_channels)
        self.act = activation_layer(activation)
        self.pool = nn.MaxPool1d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class RecurrentHead(nn.Module):
    """Opacus DPLSTM/DPGRU over (B, T, F) followed by a Linear on the last hidden state.

    Opacus's DP layers are used instead of nn.LSTM/nn.GRU because cuDNN's fused kernels
    give no per-sample gradients (Opacus `ModuleValidator` rejects nn.LSTM).
    """

    def __init__(self, cell: str, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        if cell not in RECURRENT_CELLS:
            raise ValueError(f"recurrent cell must be one of {sorted(RECURRENT_CELLS)}, got {cell!r}")
        self.rnn = RECURRENT_CELLS[cell](in_features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.rnn(x)
        return self.out(outputs[:, -1, :])


class GlobalPoolHead(nn.Module):
    """Global max+mean pooling over time of (B, C, T), then Linear-activation-Linear."""

    def __init__(self, channels: int, num_classes: int, hidden: int = 128, activation: str = "tanh") -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(2 * channels, hidden), activation_layer(activation), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=2), x.mean(dim=2)], dim=1)
        return self.fc(pooled)
