"""Model families that the server and every client build from the same config.

`build_model(task, name, input_shape, num_classes)` is the one constructor both sides call,
so the server's global model and each client's local model have identical parameter names
and shapes. Every model here passes Opacus `ModuleValidator.validate` (no BatchNorm, DP
recurrent layers) and holds no integer buffers (they break update clipping in Flower).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .sequence import ACTIVATIONS
from .speech import SpeechConv, SpeechConvRNN
from .text import TextConv, TextRNN
from .vision import VisionCNN

TASKS = ("speech", "vision", "text")

# task -> model name -> constructor(input_shape, num_classes, activation)
_MODELS: dict[str, dict[str, Callable[[Sequence[int], int, str], nn.Module]]] = {
    "vision": {
        "cnn": lambda shape, k, act: VisionCNN(in_channels=shape[0], num_classes=k, activation=act),
    },
    "speech": {
        "conv": lambda shape, k, act: SpeechConv(n_mels=shape[1], num_classes=k, activation=act),
        "conv-lstm": lambda shape, k, act: SpeechConvRNN(n_mels=shape[1], num_classes=k, cell="lstm", activation=act),
        "conv-gru": lambda shape, k, act: SpeechConvRNN(n_mels=shape[1], num_classes=k, cell="gru", activation=act),
    },
    "text": {
        "conv": lambda shape, k, act: TextConv(num_classes=k, activation=act),
        "lstm": lambda shape, k, act: TextRNN(num_classes=k, cell="lstm"),
        "gru": lambda shape, k, act: TextRNN(num_classes=k, cell="gru"),
    },
}

# Under DP-SGD the convolution-only variants were more accurate and 2-3x cheaper (DESIGN 9).
DEFAULT_MODELS = {"vision": "cnn", "speech": "conv", "text": "conv"}


def model_names(task: str) -> list[str]:
    """Names accepted by `build_model` for `task`. Raises ValueError for an unknown task."""
    if task not in _MODELS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return list(_MODELS[task])


def build_model(
    task: str, name: str | None, input_shape: Sequence[int], num_classes: int, activation: str = "tanh"
) -> nn.Module:
    """Build the model `name` (default: the task's DP default) for one example's shape.

    input_shape: one example without the batch axis: vision (C, H, W); speech (T, n_mels);
    text (L,). num_classes >= 2. activation: "tanh" (default, suits DP-SGD) or "relu" (the
    seed's). Raises ValueError naming the bad argument.
    """
    names = model_names(task)
    name = name or DEFAULT_MODELS[task]
    if name not in names:
        raise ValueError(f"model for task {task!r} must be one of {names}, got {name!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    expected_rank = {"vision": 3, "speech": 2, "text": 1}[task]
    if len(input_shape) != expected_rank:
        raise ValueError(f"input_shape for task {task!r} must have {expected_rank} axes, got {tuple(input_shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return _MODELS[task][name](tuple(input_shape), num_classes, activation)


__all__ = ["TASKS", "DEFAULT_MODELS", "build_model", "model_names"]
