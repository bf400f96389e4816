"""DP-SGD training sessions on Opacus primitives (Abadi et al. 2016), federated-safe.

One `LocalTrainingSession` per (node, dataset, hyper-parameters) per process, built once
from Opacus's pieces (the model is wrapped once: wrapping twice raises "Trying to add hooks
twice", Opacus #608) and reused round after round: each round's global weights are loaded
*in place* into the wrapped module.

- Per-sample gradients: Opacus's `GradSampleModule` in "hooks" mode (ghost and functorch
  modes crash on empty Poisson batches of models with an Embedding; DESIGN 9), after
  `ModuleValidator.validate(strict=True)` as `PrivacyEngine.make_private` does. For a linear
  head on fixed features (`linear_head`), whose per-sample gradients are rank one, the clipped
  sum is computed in closed form instead (`clipped_linear_head_sums`: same clipping, same
  noise, no (B, classes, features) tensor), unless `per_sample_gradients="hooks"`.
- Clipping and noise: Opacus's `DPOptimizer` (flat per-sample clipping to
  `max_grad_norm`, mean over the *expected* batch size N*q), whose Gaussian noise of std
  `noise_multiplier * max_grad_norm` is drawn from the node's `SecretRandom` (a ChaCha20
  keystream keyed by OS entropy, with the float-attack mitigation of Opacus's secure mode)
  instead of torch's seeded generator: `SecretNoiseDPOptimizer`.
- Poisson sampling: every record joins each batch independently with probability q, drawn
  from the same `SecretRandom` (`PoissonBatchSampler`), for *exactly*
  `steps_per_epoch(N, B)` = ceil(N/B) steps per epoch, with q = 1/ceil(N/B). The node's
  ledger charges that same integer before training; Opacus's own loader runs int(1/q)
  steps, which float rounding makes one less for about 7% of sizes (N=744, B=8: 92).

- FedProx (Li et al., MLSys 2020, "Federated Optimization in Heterogeneous Networks"): the
  proximal term mu/2 ||w - w_global||^2 has gradient mu (w - w_global), which depends on no
  record. It is added to the step's gradient *after* per-sample clipping, noise and scaling
  (`SecretNoiseDPOptimizer.pre_step`), so it uses none of the clipping budget C and the
  privacy analysis (and the ledger's charge) is exactly that of mu = 0: post-processing of
  the noised gradient with a data-independent term. Putting it in the loss instead would
  clip it together with each record's gradient.

User-level (patient-level) DP-SGD (`privacy.user_level`): given each record's group, the
session Poisson-samples groups instead of records, averages each sampled group's per-record
gradients and clips the group's mean as one unit (`SecretNoiseDPOptimizer.group_batch`),
with q = 1/ceil(G/B) over the G groups and B the expected groups per step.

Accounting is *not* done here: the node's persisted `PrivacyLedger` is charged before each
round (`client.node_training`). The session's own Opacus `RDPAccountant` only counts the
noised steps it ran, as a cross-check that the ledger charged exactly what was run.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared_models.records import LabeledArrays
from shared_models.run_config import CLIPPING_MODES
from privacy.secret_randomness import SecretRandom
from privacy.user_level import GroupBatch, GroupPoissonSampler, group_means

# The first layer's input never requires a gradient, so torch notes that Opacus's per-sample
# gradient hooks fire on module outputs only: expected for DP-SGD, nothing a site can act on.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                        "module outputs", category=UserWarning)


AUTOMATIC_CLIPPING_GAMMA = 0.01  # Bu et al. 2023's stability constant (their default)

# batch_size 0 = full batch: every step uses the whole training share (q = 1, one step per
# epoch: DP gradient descent). It wins for small heads on fixed features (issue 14), where the
# noise on the mean gradient, sigma*C/(N q), is what limits accuracy.
FULL_BATCH = 0


PER_SAMPLE_GRADIENTS = ("auto", "hooks")  # "auto": closed form for a linear head, else Opacus's hooks


def linear_head(model: nn.Module) -> nn.Linear | None:
    """`model.linear` when it is all `model` trains and `model.features` is the fixed front-end
    it reads (forward(x) = linear(features(x)): `SpeechLinear`, `VisionLinear`, the hashed text
    models); None otherwise."""
    head = getattr(model, "linear", None)
    if not isinstance(head, nn.Linear) or head.bias is None or not callable(getattr(model, "features", None)):
        return None
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return head if trainable == {id(head.weight), id(head.bias)} else None


@torch.no_grad()
def clipped_linear_head_sums(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                             max_grad_norm: float, clipping: str = "flat") -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the batch of the clipped per-sample cross-entropy gradients of a linear head.

    features (B, d) (the head's input), logits (B, K) = features @ W.T + b, labels (B,) int64.
    Record i's loss gradient is e_i f_i^T for W and e_i for b, with e_i = softmax(logits_i) -
    onehot(y_i): rank one, so its norm is ||e_i|| sqrt(||f_i||^2 + 1) without forming it, and
    the clipped sum is (c * E)^T F and sum_i c_i e_i, c_i the clip factor: Opacus 1.6.0's flat
    min(1, C/(norm + 1e-6)) or automatic C/(norm + AUTOMATIC_CLIPPING_GAMMA) (Bu et al. 2023),
    exactly what `SecretNoiseDPOptimizer.clip_and_accumulate` computes from the materialised
    per-sample gradients (Goodfellow 2015, "Efficient per-example gradient computations", for
    the norm identity). A record whose e or f is not finite contributes 0, like there.
    Returns (weight sum (K, d), bias sum (K,)). Raises ValueError for another clipping name.
    """
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"clipping must be one of {list(CLIPPING_MODES)}, got {clipping!r}")
    errors = torch.softmax(logits.float(), dim=1)
    errors[torch.arange(len(labels)), labels] -= 1.0
    norms = torch.linalg.vector_norm(errors, dim=1) * (torch.linalg.vector_norm(features, dim=1) ** 2 + 1.0).sqrt()
    # A NaN or infinite entry in e or f makes the norm non-finite (an overflowing one too, where
    # Opacus's factor C/inf would give 0 as well): such records are zeroed, e = 0 adds nothing.
    finite = torch.isfinite(norms)
    if not bool(finite.all()):
        errors = torch.where(finite[:, None], errors, torch.zeros_like(errors))
        features = torch.where(finite[:, None], features, torch.zeros_like(features))
        norms = torch.where(finite, norms, torch.zeros_like(norms))
    if clipping == "flat":
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    else:
        factor = max_grad_norm / (norms + AUTOMATIC_CLIPPING_GAMMA)
    scaled = errors * factor[:, None]
    return scaled.T @ features, scaled.sum(dim=0)


def steps_per_epoch(num_records: int, batch_size: int) -> int:
    """DP-SGD steps in one (expected) pass over the data: ceil(N / B), in integers; 1 for
    batch_size FULL_BATCH (0).

    Raises ValueError unless num_records >= 1 and batch_size >= 0.
    """
    if num_records < 1 or batch_size < 0:
        raise ValueError(f"need num_records >= 1 and batch_size >= 0 (0: full batch), got {num_records}, {batch_size}")
    if batch_size == FULL_BATCH:
        return 1
    return -(-num_records // batch_size)


def poisson_sample_rate(num_records: int, batch_size: int) -> float:
    """Sampling rate q = 1 / ceil(N / B): the expected batch is N*q <= B records (q = 1 for FULL_BATCH)."""
    return 1.0 / steps_per_epoch(num_records, batch_size)


class PoissonBatchSampler:
    """Batches of record indices for DP-SGD: each record joins each batch with probability q.

    Yields exactly `steps` batches per pass (an index array each, possibly empty). The
    inclusion draws come from `randomness` (secret on a node), so the coordinator cannot
    know which records a step used (Poisson subsampling's amplification assumes that).
    """

    def __init__(self, num_records: int, sample_rate: float, steps: int, randomness: SecretRandom) -> None:
        if num_records < 1 or steps < 1 or not 0 < sample_rate <= 1:
            raise ValueError(f"need num_records >= 1, steps >= 1, 0 < sample_rate <= 1; got {num_records}, "
                             f"{steps}, {sample_rate}")
        self.num_records, self.sample_rate, self.steps, self.randomness = num_records, sample_rate, steps, randomness

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield np.flatnonzero(self.randomness.bernoulli(self.num_records, self.sample_rate))


class SecretNoiseDPOptimizer(DPOptimizer):
    """Opacus's `DPOptimizer` with its Gaussian noise drawn from a `SecretRandom`.

    Same clipping, accumulation and scaling as Opacus, except: `add_noise` draws
    N(0, (noise_multiplier * max_grad_norm)^2) per parameter coordinate from the node's
    ChaCha20 keystream (float-attack mitigated, `privacy.secret_randomness`), not from torch's
    seeded generator; and `clip_and_accumulate` first zeroes samples with non-finite
    gradients. Written against opacus 1.6.0 (pinned), whose `add_noise` it mirrors.

    User-level DP-SGD: with `group_batch` set to the step's `GroupBatch`, the per-record
    gradients are first averaged per sampled group, so each *group* is clipped to C and
    `expected_batch_size` must be the expected number of groups.

    clipping: "flat" (Opacus's g * min(1, C/||g||)) or "automatic" (Bu et al., NeurIPS 2023,
    "Automatic Clipping: Differentially Private Deep Learning Made Easier and Stronger":
    g * C/(||g|| + gamma), gamma = AUTOMATIC_CLIPPING_GAMMA, every gradient normalised, none
    kept as is). Both bound each unit's contribution by C, so the noise sigma*C and the
    accounting are the same. Raises ValueError for another name.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, randomness: SecretRandom, clipping: str = "flat") -> None:
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {list(CLIPPING_MODES)}, got {clipping!r}")
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean")
        self.clipping = clipping
        self.randomness = randomness
        self.proximal: Proximal | None = None
        self.group_batch: GroupBatch | None = None

    def pre_step(self, closure=None) -> bool:
        """Opacus's clip, noise and scale, then the FedProx gradient (`proximal`), if any."""
        ready = super().pre_step(closure)
        if ready and self.proximal is not None:
            self.proximal.add_gradient()
        return ready

    def clip_and_accumulate(self) -> None:
        """Opacus's per-sample clipping, after zeroing every sample whose gradient is not finite.

        A record whose gradient overflows (NaN/Inf: the coordinator can craft weights that do
        this for one chosen record) would otherwise turn the whole clipped sum, and the node's
        reply, into NaN: a membership test outside DP. Zeroed, it contributes 0, within the
        clipping bound C like any record.
        """
        for p in self.params:
            if isinstance(p.grad_sample, list):  # accumulated batches (not used here): one tensor
                p.grad_sample = torch.cat(p.grad_sample, dim=0)
        if self.group_batch is not None:  # user-level: the clipping unit is the sampled group
            slots = torch.as_tensor(self.group_batch.slots, dtype=torch.long)
            for p in self.params:
                if len(p.grad_sample) != len(slots):
                    raise RuntimeError(f"{len(p.grad_sample)} per-record gradients for {len(slots)} sampled records")
                p.grad_sample = group_means(p.grad_sample, slots.to(p.grad_sample.device), self.group_batch.groups)
        samples = self.grad_samples
        if len(samples[0]):
            finite = torch.stack([torch.isfinite(g.reshape(len(g), -1)).all(dim=1) for g in samples]).all(dim=0)
            if not bool(finite.all()):
                for p in self.params:
                    p.grad_sample = torch.where(finite.view(-1, *[1] * (p.grad_sample.dim() - 1)), p.grad_sample,
                                                torch.zeros_like(p.grad_sample))
        if self.clipping == "flat":
            super().clip_and_accumulate()
            return
        # Automatic clipping: Opacus 1.6.0's clip_and_accumulate with C/(||g|| + gamma) as the factor.
        if len(samples[0]) == 0:
            factor = torch.zeros((0,), device=samples[0].device)
        else:
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
            factor = self.max_grad_norm / (norms + AUTOMATIC_CLIPPING_GAMMA)  # ||factor * g|| < C
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor.to(grad_sample.device).to(p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def step_from_clipped_sums(self, sums: dict[nn.Parameter, torch.Tensor]) -> None:
        """One DP step from clipped per-sample gradient sums computed elsewhere
        (`clipped_linear_head_sums`): `pre_step`'s noise, scaling by the expected batch size and
        FedProx gradient, then the wrapped optimizer's step. The caller counts the step in its
        accountant (Opacus's step hook needs per-sample gradients). sums: {param: tensor of
        its shape}, one per optimized parameter; raises KeyError for a missing one."""
        for p in self.params:
            p.summed_grad = sums[p].to(p.dtype).view_as(p)
        self.add_noise()
        for p in self.params:
            p.grad /= self.expected_batch_size
        if self.proximal is not None:
            self.proximal.add_gradient()
        self.original_optimizer.step()
        for p in self.params:
            p.summed_grad = None

    def add_noise(self) -> None:
        """p.grad <- (sum of clipped per-sample gradients) + secret Gaussian noise, for every parameter."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self.randomness.gaussian_like(p.summed_grad, std)).view_as(p)
            _mark_as_processed(p.summed_grad)


class Proximal:
    """FedProx's proximal term mu/2 ||w - w_anchor||^2 over `params`, anchored at the round's
    global weights (Li et al. 2020). `add_gradient` adds mu (w - w_anchor) to each p.grad:
    the exact gradient of the term, in the units of the mean loss the optimizer steps on.
    Raises ValueError for a negative or non-finite mu."""

    def __init__(self, params: list[nn.Parameter], mu: float) -> None:
        if not 0 <= mu < float("inf"):
            raise ValueError(f"proximal mu must be finite and >= 0, got {mu}")
        self.params, self.mu = params, mu
        self.anchor = [p.detach().clone() for p in params]

    def reset(self) -> None:
        """Anchor at the parameters' current values (call after loading the global weights)."""
        self.anchor = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def add_gradient(self) -> None:
        """p.grad += mu (p - anchor) for every parameter."""
        for p, anchor in zip(self.params, self.anchor):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p - anchor, alpha=self.mu)


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
    train_loss: float  # mean minibatch loss over the round: for the node's own log, never released


class LocalTrainingSession:
    """Local training of one node's model, DP or not, reused across rounds in a process.

    model: built by `shared_models.build_model`; train: the node's training share (N records).
    With `noise_multiplier=None` training is plain minibatch SGD/Adam (shuffled batches of
    `batch_size`; FULL_BATCH = 0: all N records in one step); otherwise DP-SGD as described in the module docstring, with every noise
    and sampling draw from the `SecretRandom` given to `train_epochs`. proximal_mu > 0 adds
    FedProx's term, anchored at each round's global weights (`Proximal`; under DP after
    clipping and noise). groups: (N,) int64 group index of each record (0..G-1) for
    user-level DP-SGD (`privacy.user_level`): Poisson sampling over groups at
    q = 1/ceil(G/batch_size), each group clipped as one unit, at most
    `max_records_per_group` records of a group per step (0: all). clipping: "flat" or
    "automatic" (`SecretNoiseDPOptimizer`; DP only). per_sample_gradients: "auto" (record-level
    DP of a `linear_head` model: closed-form clipped sums, `clipped_linear_head_sums`; else
    Opacus's hooks) or "hooks" (always Opacus's GradSampleModule). Raises ValueError for an empty training share or a negative mu, and Opacus's UnsupportedModuleError for a model DP-SGD cannot
    train (e.g. BatchNorm).
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
        proximal_mu: float = 0.0,
        groups: np.ndarray | None = None,
        max_records_per_group: int = 0,
        clipping: str = "flat",
        per_sample_gradients: str = "auto",
    ) -> None:
        if per_sample_gradients not in PER_SAMPLE_GRADIENTS:
            raise ValueError(f"per_sample_gradients must be one of {list(PER_SAMPLE_GRADIENTS)}, "
                             f"got {per_sample_gradients!r}")
        if len(train) == 0:
            raise ValueError("training share is empty")
        self.device = device
        self.dp = noise_multiplier is not None
        self.num_records = len(train)
        self.batch_size = batch_size
        user_level = groups is not None and self.dp
        # The sampled unit: a record, or under user-level DP a group.
        units = int(np.max(groups)) + 1 if user_level else len(train)
        self.steps_per_epoch = steps_per_epoch(units, batch_size)
        self.sample_rate = 1.0 / self.steps_per_epoch
        self.x, self.y = _tensors(train).tensors
        model = model.to(device).train()
        opt = make_optimizer(optimizer, model.parameters(), lr, momentum)
        # Closed-form clipped sums for a linear head at record level (a group's mean gradient is
        # not rank one); Opacus's hooks otherwise.
        self.head = (linear_head(model) if self.dp and not user_level and per_sample_gradients == "auto"
                     else None)
        if self.dp:
            ModuleValidator.validate(model, strict=True)
            if self.head is None:
                self.model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
                self.model.forbid_grad_accumulation()  # each step's batch is one Poisson sample
            else:
                self.model = model
            randomness = SecretRandom()  # replaced by each train_epochs call's
            self.optimizer = SecretNoiseDPOptimizer(
                opt, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                expected_batch_size=units * self.sample_rate, randomness=randomness, clipping=clipping,
            )
            self.accountant = RDPAccountant()
            if self.head is None:  # the closed-form path counts its steps in `_closed_form_step`
                self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
            self.sampler = (GroupPoissonSampler(groups, self.sample_rate, self.steps_per_epoch, randomness,
                                                max_records_per_group) if user_level else
                            PoissonBatchSampler(len(train), self.sample_rate, self.steps_per_epoch, randomness))
        else:
            self.model, self.optimizer = model, opt
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.proximal = Proximal(trainable, proximal_mu) if proximal_mu != 0 else None
        if self.dp:
            self.optimizer.proximal = self.proximal
        self.criterion = nn.CrossEntropyLoss()

    @property
    def module(self) -> nn.Module:
        """The plain model (unwrapped from Opacus's GradSampleModule)."""
        return self.model._module if isinstance(self.model, GradSampleModule) else self.model

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        """Load the global weights in place; fresh optimizer state each round."""
        self.module.load_state_dict(state)
        inner = self.optimizer.original_optimizer if self.dp else self.optimizer
        inner.state = defaultdict(dict)
        if self.proximal is not None:
            self.proximal.reset()

    def opacus_steps(self) -> int:
        """Noised steps Opacus's own accountant saw in this process (cross-check for the ledger)."""
        return sum(int(n) for _, _, n in self.accountant.history) if self.dp else 0

    def _batches(self):
        """One pass: secret Poisson batches under DP, else a shuffled partition into batches of B."""
        if self.dp:
            yield from self.sampler
            return
        order = torch.randperm(self.num_records)
        yield from torch.split(order, self.batch_size or self.num_records)  # 0: full batch

    def train_epochs(self, epochs: int, randomness: SecretRandom | None = None) -> RoundResult:
        """Run `epochs` passes (DP: exactly `epochs * ceil(N/B)` Poisson steps, N the records or
        under user-level DP the groups). Returns new weights.

        randomness: the source of this call's noise and Poisson draws (default: fresh OS
        entropy; `client.node_training.node_randomness` picks it for a node's round).
        """
        if self.dp:
            self.optimizer.randomness = self.sampler.randomness = randomness or SecretRandom()
        self.model.train()
        losses, steps = [], 0
        for _ in range(epochs):
            for index in self._batches():
                if isinstance(index, GroupBatch):
                    self.optimizer.group_batch, index = index, index.records
                index = torch.as_tensor(index, dtype=torch.long)
                x, y = self.x[index].to(self.device), self.y[index].to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                if self.head is not None:
                    losses.extend(self._closed_form_step(x, y))
                    steps += 1
                    continue
                if len(y) == 0:
                    # Empty Poisson batch: still a DP step (noise only), so the accountant
                    # and the privacy analysis stay aligned.
                    loss = self.model(x).sum() * 0.0
                else:
                    loss = self.criterion(self.model(x), y)
                    losses.append(float(loss.detach()))
                loss.backward()
                if self.proximal is not None and not self.dp:  # under DP: the optimizer's pre_step, after the noise
                    self.proximal.add_gradient()
                self.optimizer.step()
                steps += 1
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return RoundResult(state=state, steps=steps, train_loss=float(np.mean(losses)) if losses else float("nan"))


    def _closed_form_step(self, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """One DP step of a linear head from `clipped_linear_head_sums` (an empty Poisson batch:
        zero sums, noise only, still a step); counted in the accountant. Returns the batch's
        mean loss, or nothing for an empty batch."""
        with torch.no_grad():
            features = self.module.features(x).flatten(1)
            logits = self.head(features)
            weight, bias = clipped_linear_head_sums(features, logits, y, self.optimizer.max_grad_norm,
                                                   self.optimizer.clipping)
        self.optimizer.step_from_clipped_sums({self.head.weight: weight, self.head.bias: bias})
        self.accountant.step(noise_multiplier=self.optimizer.noise_multiplier, sample_rate=self.sample_rate)
        return [float(nn.functional.cross_entropy(logits, y))] if len(y) else []


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledArrays, device: torch.device, batch_size: int = 512,
             balanced_accuracy: bool = False) -> dict[str, float]:
    """Loss (mean cross-entropy, nats), accuracy, and ROC AUC for binary tasks.

    Returns {"loss", "accuracy"} plus "auc" when there are 2 classes and both occur, plus
    "balanced_accuracy" (the mean of the per-class recalls over the classes present, as
    scikit-learn's `balanced_accuracy_score`) when asked: the coordinator asks on its test
    split; a node's replies keep their listed releases (`privacy.releases`).
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
    if balanced_accuracy and len(y_all):
        from sklearn.metrics import balanced_accuracy_score

        out["balanced_accuracy"] = float(balanced_accuracy_score(y_all, np.concatenate(probs).argmax(1)))
    if data.num_classes == 2 and len(np.unique(y_all)) == 2:
        from sklearn.metrics import roc_auc_score

        out["auc"] = float(roc_auc_score(y_all, np.concatenate(probs)[:, 1]))
    return out
