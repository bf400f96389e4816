"""DP-SGD training sessions on Opacus (Abadi et al. 2016), federated-safe.

One `DPSGDSession` per (node, dataset, hyper-parameters) per process: `make_private` is
called once (calling it twice on one model raises "Trying to add hooks twice", Opacus
#608), and each round's global weights are loaded *in place* into the wrapped module.
Poisson sampling (`DPDataLoader`), per-sample clipping to `max_grad_norm`, Gaussian noise
of std `noise_multiplier * max_grad_norm`, per-sample gradients in "hooks" mode (ghost and
functorch modes crash on empty Poisson batches of models with an Embedding; DESIGN 9).

Accounting is *not* done here: the node's persisted `NodePrivacyLedger` is charged before
each round (`client.node_training`). The session's own Opacus accountant only counts steps,
as a cross-check that the ledger charged exactly what was run.

`secure_mode=True` (cryptographically secure noise) needs `torchcsprng`, which no longer
builds for current torch; noise here comes from torch's default PRNG.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.datasets import LabeledArrays


def poisson_sample_rate(num_records: int, batch_size: int) -> float:
    """Sampling rate q that Opacus derives for Poisson batches: 1 / ceil(N / B)."""
    if num_records < 1 or batch_size < 1:
        raise ValueError(f"need num_records >= 1 and batch_size >= 1, got {num_records}, {batch_size}")
    return 1.0 / math.ceil(num_records / batch_size)


def steps_per_epoch(num_records: int, batch_size: int) -> int:
    """DP-SGD steps in one (expected) pass over the data: ceil(N / B)."""
    return math.ceil(num_records / batch_size)


def _tensors(data: LabeledArrays) -> TensorDataset:
    x = torch.from_numpy(np.ascontiguousarray(data.x))
    return TensorDataset(x, torch.from_numpy(data.y))


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    """"sgd" (with `momentum`) or "adam". Raises ValueError for any other name."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


@dataclass
class RoundResult:
    """What one round of local training produced."""

    state: dict[str, torch.Tensor]  # new local weights (CPU tensors)
    steps: int
    train_loss: float  # mean minibatch loss over the round


class LocalTrainingSession:
    """Local training of one node's model, DP or not, reused across rounds in a process.

    model: built by `shared_models.build_model`; train: the node's training share.
    With `noise_multiplier=None` training is plain minibatch SGD/Adam (shuffled batches of
    `batch_size`); otherwise DP-SGD as described in the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        train: LabeledArrays,
        *,
        batch_size: int,
        lr: float,
        optimizer: str,
        momentum: float = 0.0,
        noise_multiplier: float | None,
        max_grad_norm: float,
        device: torch.device,
    ) -> None:
        if len(train) == 0:
            raise ValueError("training share is empty")
        self.device = device
        self.dp = noise_multiplier is not None
        self.num_records = len(train)
        model = model.to(device).train()  # Opacus refuses a model in eval mode
        opt = make_optimizer(optimizer, model.parameters(), lr, momentum)
        loader = DataLoader(_tensors(train), batch_size=batch_size, shuffle=True)
        if self.dp:
            self.engine = PrivacyEngine(accountant="rdp")
            self.model, self.optimizer, self.loader = self.engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode="hooks",
            )
            self.sample_rate = float(self.loader.sample_rate)
        else:
            self.model, self.optimizer, self.loader = model, opt, loader
            self.sample_rate = poisson_sample_rate(len(train), batch_size)
        self.criterion = nn.CrossEntropyLoss()

    @property
    def module(self) -> nn.Module:
        """The plain model (unwrapped from Opacus's GradSampleModule)."""
        return self.model._module if self.dp else self.model

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        """Load the global weights in place; fresh optimizer state each round."""
        self.module.load_state_dict(state)
        inner = self.optimizer.original_optimizer if self.dp else self.optimizer
        inner.state = defaultdict(dict)

    def opacus_steps(self) -> int:
        """Steps Opacus's own accountant saw in this process (cross-check for the ledger)."""
        return sum(int(n) for _, _, n in self.engine.accountant.history) if self.dp else 0

    def train_epochs(self, epochs: int) -> RoundResult:
        """Run `epochs` passes (DP: `epochs * ceil(N/B)` Poisson steps). Returns new weights."""
        self.model.train()
        losses, steps = [], 0
        for _ in range(epochs):
            for x, y in self.loader:
                x, y = x.to(self.device), y.to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                if len(y) == 0:
                    # Empty Poisson batch: still a DP step (noise only), so the accountant
                    # and the privacy analysis stay aligned.
                    logits = self.model(x)
                    loss = logits.sum() * 0.0
                else:
                    loss = self.criterion(self.model(x), y)
                    losses.append(float(loss.detach()))
                loss.backward()
                self.optimizer.step()
                steps += 1
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return RoundResult(state=state, steps=steps, train_loss=float(np.mean(losses)) if losses else float("nan"))


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledArrays, device: torch.device, batch_size: int = 512) -> dict[str, float]:
    """Loss (mean cross-entropy, nats), accuracy, and ROC AUC for binary tasks.

    Returns {"loss", "accuracy"} plus "auc" when there are 2 classes and both occur.
    """
    model.eval()
    loader = DataLoader(_tensors(data), batch_size=batch_size)
    total_loss, correct, probs, labels = 0.0, 0, [], []
    for x, y in loader:
        logits = model(x.to(device)).cpu()
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        probs.append(torch.softmax(logits, 1).numpy())
        labels.append(y.numpy())
    n = max(len(data), 1)
    out = {"loss": total_loss / n, "accuracy": correct / n}
    y_all = np.concatenate(labels) if labels else np.zeros(0)
    if data.num_classes == 2 and len(np.unique(y_all)) == 2:
        from sklearn.metrics import roc_auc_score

        out["auc"] = float(roc_auc_score(y_all, np.concatenate(probs)[:, 1]))
    return out
