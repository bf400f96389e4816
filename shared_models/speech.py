"""Speech models over log-mel frames.

Seed sketch: Conv1D(64)-MaxPool-Conv1D(128)-MaxPool-LSTM(128)-Dense over log-mel frames.
`SpeechConvRNN` follows it (LSTM or GRU, via Opacus DP layers). `SpeechConv` replaces the
recurrent layer with a third convolution and global pooling: under DP-SGD it was both more
accurate and 2-3x cheaper here (DESIGN 9: FSDD eps=8, conv-only 0.81 vs Conv1d+LSTM 0.57),
so it is the DP default.
"""

from __future__ import annotations

import torch
from torch import nn

from .sequence import ConvBlock1d, GlobalPoolHead, RecurrentHead


class SpeechConvRNN(nn.Module):
    """The seed's Conv1d-Conv1d-(LSTM|GRU)-Dense speech model.

    Input: log-mel frames (B, T, n_mels), any T >= 1. Output: logits (B, num_classes).
    """

    def __init__(self, n_mels: int, num_classes: int, cell: str = "lstm", hidden: int = 128, activation: str = "tanh") -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvBlock1d(n_mels, 64, activation=activation), ConvBlock1d(64, 128, activation=activation))
        self.head = RecurrentHead(cell, 128, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.convs(x.transpose(1, 2))  # (B, 128, T/4)
        return self.head(features.transpose(1, 2))


class SpeechConv(nn.Module):
    """Convolution-only speech model (DP default).

    Input: log-mel frames (B, T, n_mels), any T >= 1. Output: logits (B, num_classes).
    """

    def __init__(self, n_mels: int, num_classes: int, activation: str = "tanh") -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvBlock1d(n_mels, 64, activation=activation),
            ConvBlock1d(64, 128, activation=activation),
            ConvBlock1d(128, 128, 3, activation=activation),
        )
        self.head = GlobalPoolHead(128, num_classes, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x.transpose(1, 2)))


class SpeechLinear(nn.Module):
    """The time-average of fixed per-frame features + a linear classifier (DP-first speech model).

    Made for the wavelet scattering front-end (`--audio-features scattering`: T = 1 frame of
    336 log-scattering coefficients, each clip unit-norm), where only F x num_classes weights
    and num_classes biases are trained: DP-SGD's noise is spread over few parameters
    (Tramer & Boneh, ICLR 2021). Works on log-mel frames too (their time-average).

    Input: features (B, T, F), any T >= 1. Output: logits (B, num_classes).
    """

    def __init__(self, n_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F): the time-average of the frames (no trainable parameters)."""
        return x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))
