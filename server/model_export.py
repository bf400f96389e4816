"""The released model as a file that loads without fedpriv: a `torch.export` program.

`final_model.pt2` in the run folder holds the released model's graph and weights (those of
final_model.pt: the final global model, or its EMA with --ema-decay; torch.export, with the
batch dimension dynamic), so a site or a user loads and runs it with torch alone:

    import torch
    model = torch.export.load("runs/.../final_model.pt2").module()
    probabilities = torch.softmax(model(x), dim=1)     # x as in `shared_models.records`

(TorchScript, the older format, is deprecated in torch 2.13; ONNX would need an exporter
that is not installed here.) The model carries the privacy of the run that trained it:
each node's sample-level epsilon in summary.json (`max_client_epsilon`), and client-level
epsilon when secure aggregation added client-level noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

EXPORT_FILE = "final_model.pt2"


def export_model(model: nn.Module, example: np.ndarray, path: str | Path) -> Path:
    """Write `model` (in eval mode) to `path` with torch.export; returns the path.

    example: a batch of inputs, (B, ...) as the model takes them (its dtype and trailing
    shape are fixed in the program; the batch size is not). Raises torch's export errors
    for a model it cannot trace.
    """
    model = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(example[:2]))
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.export.save(program, tmp)
    tmp.replace(path)
    return path
