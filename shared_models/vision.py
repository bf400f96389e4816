"""Vision models: the seed's small CNN, made DP-ready, and small heads over scattering maps.

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

Over the fixed wavelet scattering front-end (`--image-features scattering`: 81 maps per
channel at a quarter of the size, `shared_models.datasets.images.scattering_image_features`),
only a small head is trained, so DP-SGD's noise is spread over few parameters (Tramer & Boneh,
"Differentially private learning needs better features (or much more data)", ICLR 2021):
`VisionLinear` (a linear classifier over all maps) and `ScatterCNN` (their ScatterNet+CNN,
shrunk: one 3x3 convolution, GroupNorm, tanh, pooling, a linear layer).
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


class VisionLinear(nn.Module):
    """A linear classifier over every input value: logits = features(x) @ W.T + b.

    Made for scattering maps (PneumoniaMNIST: 81 x 7 x 7 = 3,969 features, 2 classes: 7,940
    parameters); on pixels it is plain logistic regression. Input: (B, C, H, W) with the
    C x H x W fixed at construction. Output: logits (B, num_classes).

    pool: None (`linear`) uses the maps as they are; k (`linear-pool3`: 3) first average-pools
    each map to k x k cells (PyTorch's adaptive pooling: on 7 x 7 maps the cells span rows and
    columns 0-2, 2-4, 4-6) and scales each image's vector to unit norm, by its own values only
    (fixed, data-independent): 81 x 3 x 3 = 729 features on PneumoniaMNIST, so DP-SGD's noise
    is spread over 5.4x fewer weights. Maps no larger than k x k (digits' 2 x 2) are used as
    they are. Raises ValueError for a pool size below 1.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, pool: int | None = None) -> None:
        super().__init__()
        if pool is not None and pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        channels, height, width = in_shape
        self.pool = pool if pool is not None and (height > pool or width > pool) else None
        cells = self.pool * self.pool if self.pool else height * width
        self.linear = nn.Linear(channels * cells, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C*cells): the maps (pooled to pool x pool and unit-normalised, if pooling) flattened
        (no trainable parameters)."""
        if self.pool is None:
            return x.flatten(1)
        flat = nn.functional.adaptive_avg_pool2d(x, self.pool).flatten(1)
        return flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class ScatterCNN(nn.Module):
    """3x3 conv -> GroupNorm -> activation -> average pool to 3x3 -> linear, over scattering maps.

    Tramer & Boneh's ScatterNet+CNN (ICLR 2021), shrunk for a few hundred records per node:
    one convolution mixing the maps locally, GroupNorm instead of BatchNorm (per-sample
    gradients; De et al. 2022). No input normalisation layer: the maps arrive standardised
    per image and order. PneumoniaMNIST (81 x 7 x 7, 2 classes) at width 8: 5,840 + 16 + 146
    = 6,002 parameters. Input: (B, in_channels, H, W), any H, W >= 1. Output: logits (B, num_classes).
    Measured once (PneumoniaMNIST, epsilon 3, its default lr 0.5, full batch, 60 rounds): test
    AUC 0.85, far below `linear` (0.95; benchmarks/results/vision_scattering.json); untuned.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 8, activation: str = "tanh") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.GroupNorm(2, width),
            activation_layer(activation),
            nn.AdaptiveAvgPool2d(3),  # 7x7 -> 3x3 (digits' 2x2 maps -> 3x3 by repetition)
        )
        self.classifier = nn.Linear(width * 9, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
