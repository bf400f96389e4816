"""Vision model: the seed's small CNN, made DP-ready.

Seed sketch (Keras): Conv2D(32,3x3)-MaxPool-Conv2D(64)-MaxPool-Flatten-Dense(128)-Dense(classes).
Changes and why:
- GroupNorm after each convolution instead of nothing/BatchNorm: BatchNorm mixes samples in
  a batch, which breaks per-sample gradients (Opacus rejects it) and keeps an integer
  buffer that breaks update clipping; GroupNorm is the standard DP replacement
  (De et al. 2022, "Unlocking high-accuracy differentially private image classification").
- tanh instead of ReLU by default (`activation="relu"` restores the seed): bounded
  activations suit per-sample clipping (Papernot et al. 2021; see `sequence.activation_layer`).
- AdaptiveAvgPool2d before Flatten so any input size works (8x8 digits, 28x28 MedMNIST,
  64x64 hospital folders) with the same parameter count.
"""

from __future__ import annotations

import torch
from torch import nn

from .sequence import activation_layer


class VisionCNN(nn.Module):
    """Small CNN for image classification.

    Input: float tensor (B, C, H, W), any H, W >= 1. Output: logits (B, num_classes).
    """

    def __init__(self, in_channels: int, num_classes: int, pooled_size: int = 4, activation: str = "tanh") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.GroupNorm(8, 32),
            activation_layer(activation),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.GroupNorm(8, 64),
            activation_layer(activation),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(pooled_size),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * pooled_size * pooled_size, 128),
            activation_layer(activation),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
