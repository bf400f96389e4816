"""Free post-processing on the server: server optimisers and an EMA of the global model.

Each round's aggregate (FedAvg in the clear, a robust rule, or the SecAgg+ mean) is a
release that every node's DP already covers; whatever the server computes from the
releases and the public global model is post-processing (Dwork & Roth 2014, Prop. 2.1) and
costs no node any privacy. Both tools below see only the aggregate, exactly what the server
holds under SecAgg+.

Server optimisers treat the round's pseudo-gradient

    Delta_t = (aggregated model) - x_t,   x_t the global model the round's nodes trained from,

as the step an optimiser scales (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2; Hsu et al. 2019 for FedAvgM):
- `fedavg`: x_{t+1} = aggregate (today's behaviour, bit for bit: the aggregate itself);
- `fedavgm`: m_t = beta1 m_{t-1} + Delta_t; x_{t+1} = x_t + eta m_t (torch's SGD with momentum
  beta1, dampening 0, on the gradient -Delta_t);
- `fedadam`: m_t = beta1 m_{t-1} + (1 - beta1) Delta_t; v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2;
  x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau);
- `fedyogi`: as fedadam but v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2).
All per coordinate, with m_{-1} = 0 and v_{-1} = tau^2 (the least Algorithm 2 allows) and no
bias correction (Algorithm 2 has none; torch's Adam always corrects, so it is not used;
Flower's FedAdam and FedYogi start v at 0 and its FedAdam corrects: early rounds differ from
theirs). Without bias correction the first adaptive steps move each coordinate by up to about
eta (1 - beta1) / sqrt(1 - beta2) = eta at the defaults, so fedadam/fedyogi want eta near
Reddi et al.'s tuned 1e-2 to 1e-1 rather than fedavgm's 1 (digits, 2 nodes, 2 rounds: fedadam
at eta = 1 left the model at chance, 0.09; at 0.01 it reached 0.63, FedAvg 0.70).

Only floating-point arrays move; integer state (BatchNorm's num_batches_tracked) takes the
aggregate's value. Moments are kept in float64; the new arrays keep the aggregate's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
# Default eta per optimiser: the adaptive ones move each coordinate by about eta per round
# (no bias correction), so 1.0 wrecks a model (digits: 0.09); Reddi et al. tune eta in 1e-3..1.
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


def _float_keys(current: ArrayRecord, aggregate: ArrayRecord) -> list[str]:
    """The keys whose arrays are floating point in both the global model and the aggregate, in order.

    Raises ValueError when the two do not hold the same keys and shapes. (Its dtype test
    decides on the first step only: Flower's weighted mean turns an integer counter into
    float64, so later rounds' dtypes no longer say which arrays are parameters.)
    """
    if list(current.keys()) != list(aggregate.keys()):
        raise ValueError(f"aggregate keys {list(aggregate.keys())} differ from the global model's {list(current.keys())}")
    keys = []
    for key in current.keys():
        if tuple(current[key].shape) != tuple(aggregate[key].shape):
            raise ValueError(f"aggregate '{key}' has shape {tuple(aggregate[key].shape)}, the global model's "
                             f"{tuple(current[key].shape)}")
        if np.issubdtype(current[key].numpy().dtype, np.floating) and \
                np.issubdtype(aggregate[key].numpy().dtype, np.floating):
            keys.append(key)
    return keys


def optimizer_config(cfg: dict) -> dict:
    """ServerOptimizer's keyword arguments from the run-config (pyproject's [tool.flwr.app.config] keys
    `server-optimizer`, `server-lr`, `server-momentum`, `server-beta2`, `server-tau`; absent: the defaults)."""
    return {"name": str(cfg.get("server-optimizer", "fedavg")), "lr": float(cfg.get("server-lr", 1.0)),
            "momentum": float(cfg.get("server-momentum", 0.9)), "beta2": float(cfg.get("server-beta2", 0.99)),
            "tau": float(cfg.get("server-tau", 1e-3))}


class ServerOptimizer:
    """A server optimiser over the rounds' pseudo-gradients (module docstring for the equations).

    name: one of SERVER_OPTIMIZERS; lr: eta > 0; momentum: beta1 in [0, 1) (FedAvgM's
    momentum, Adam/Yogi's first-moment decay); beta2: in [0, 1) (Adam/Yogi); tau: > 0,
    Adam/Yogi's adaptivity (and v_{-1} = tau^2). Raises ValueError for anything else.
    The state (moments, step count) survives a resume through `state_dict`/`load_state_dict`.
    """

    def __init__(self, name: str = "fedavg", lr: float = 1.0, momentum: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS}, got {name!r}")
        if not 0 < lr < math.inf:
            raise ValueError(f"server lr must be a finite number > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        if not 0 <= beta2 < 1:
            raise ValueError(f"server beta2 must be in [0, 1), got {beta2}")
        if not 0 < tau < math.inf:
            raise ValueError(f"server tau must be a finite number > 0, got {tau}")
        self.name, self.lr, self.momentum, self.beta2, self.tau = name, float(lr), float(momentum), float(beta2), float(tau)
        self.steps = 0  # rounds whose aggregate went through step()
        self.keys: list[str] | None = None  # the arrays that move, fixed at the first step (floating point then)
        self.m: dict[str, np.ndarray] = {}  # fedadam/fedyogi: first moment, float64, per float key
        self.v: dict[str, np.ndarray] = {}  # second moment
        self._params: dict[str, torch.Tensor] = {}  # fedavgm: float64 copies of x_t that torch's SGD moves
        self._sgd: torch.optim.SGD | None = None

    def describe(self) -> dict:
        """The name and the hyper-parameters this optimiser uses (summary.json `server_optimizer`)."""
        if self.name == "fedavg":
            return {"name": "fedavg"}
        if self.name == "fedavgm":
            return {"name": "fedavgm", "lr": self.lr, "momentum": self.momentum}
        return {"name": self.name, "lr": self.lr, "beta1": self.momentum, "beta2": self.beta2, "tau": self.tau}

    def step(self, current: ArrayRecord, aggregate: ArrayRecord) -> ArrayRecord:
        """The next global model from the global model x_t the round started from and the round's aggregate.

        fedavg returns `aggregate` itself. Raises ValueError when the two differ in keys or shapes.
        """
        if self.name == "fedavg":
            return aggregate
        if self.keys is None:
            self.keys = _float_keys(current, aggregate)
        else:
            _float_keys(current, aggregate)  # same keys and shapes
        keys = self.keys
        x = {k: current[k].numpy().astype(np.float64) for k in keys}
        delta = {k: aggregate[k].numpy().astype(np.float64) - x[k] for k in keys}
        if self.name == "fedavgm":
            new = self._sgd_step(x, delta)
        else:
            if not self.m:
                self.m = {k: np.zeros_like(x[k]) for k in keys}
                self.v = {k: np.full_like(x[k], self.tau ** 2) for k in keys}
            b1, b2 = self.momentum, self.beta2
            new = {}
            for k in keys:
                d2 = delta[k] * delta[k]
                self.m[k] = b1 * self.m[k] + (1 - b1) * delta[k]
                if self.name == "fedadam":
                    self.v[k] = b2 * self.v[k] + (1 - b2) * d2
                else:  # Yogi: v moves towards Delta^2 by (1 - beta2) Delta^2 at most, never overshooting in sign
                    self.v[k] = self.v[k] - (1 - b2) * d2 * np.sign(self.v[k] - d2)
                new[k] = x[k] + self.lr * self.m[k] / (np.sqrt(self.v[k]) + self.tau)
        self.steps += 1
        out = {}
        for key in aggregate.keys():
            if key in new:
                out[key] = Array(new[key].astype(aggregate[key].numpy().dtype))
            else:
                out[key] = aggregate[key]  # integer state: the aggregate's value
        return ArrayRecord(out)

    def _sgd_step(self, x: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """FedAvgM with torch's SGD: grad = -Delta, so buf = -m and p -= eta * buf is x + eta m."""
        if self._sgd is None:
            self._build_sgd({k: value.shape for k, value in x.items()})
        for key, param in self._params.items():
            param.data.copy_(torch.from_numpy(x[key]))  # the round's x_t (the global, as the nodes received it)
            param.grad = torch.from_numpy(-delta[key])
        self._sgd.step()
        return {key: param.detach().numpy().copy() for key, param in self._params.items()}

    def _build_sgd(self, shapes: dict[str, tuple]) -> None:
        self._params = {k: torch.zeros(tuple(shape), dtype=torch.float64, requires_grad=True) for k, shape in shapes.items()}
        self._sgd = torch.optim.SGD(list(self._params.values()), lr=self.lr, momentum=self.momentum, dampening=0.0,
                                    nesterov=False, weight_decay=0.0)

    def state_dict(self) -> dict:
        """The optimiser's state for a checkpoint (numpy arrays, ints, torch's SGD state dict)."""
        state: dict = {"name": self.name, "steps": self.steps, "keys": self.keys}
        if self.name == "fedavgm" and self._sgd is not None:
            state["shapes"] = {k: tuple(p.shape) for k, p in self._params.items()}
            state["sgd"] = self._sgd.state_dict()
        elif self.m:
            state["m"] = {k: v.copy() for k, v in self.m.items()}
            state["v"] = {k: v.copy() for k, v in self.v.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output. Raises ValueError when it was another optimiser's."""
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds server optimizer {state.get('name')!r} state, the run uses {self.name!r}")
        self.steps = int(state["steps"])
        self.keys = None if state.get("keys") is None else list(state["keys"])
        if "sgd" in state:
            self._build_sgd(state["shapes"])
            self._sgd.load_state_dict(state["sgd"])
            # The checkpoint's lr/momentum are the run-config's (a resume keeps config.json); keep ours.
            for group in self._sgd.param_groups:
                group.update(lr=self.lr, momentum=self.momentum)
        if "m" in state:
            self.m = {k: np.array(v, dtype=np.float64) for k, v in state["m"].items()}
            self.v = {k: np.array(v, dtype=np.float64) for k, v in state["v"].items()}


class ModelEMA:
    """An exponential moving average of the global model: ema = D * ema + (1 - D) * global.

    decay: D in (0, 1). Updated after each aggregated round (`update`); the first update
    copies the global model (as torch's `AveragedModel` does), so the average never holds
    the random initial model. Floating-point arrays are averaged in float64 and handed back
    in the global model's dtype; integer state takes the latest global value.
    Raises ValueError for a decay outside (0, 1).
    """

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self._average: dict[str, np.ndarray] = {}  # float keys, float64
        self._latest: ArrayRecord | None = None  # the last global model averaged in: dtypes, integer state

    def update(self, arrays: ArrayRecord) -> None:
        """Average in the new global model `arrays` (same keys and shapes every round).

        The averaged keys are those floating point at the first update (`_float_keys`' note).
        """
        first = self._latest is None
        for key in arrays.keys():
            value = arrays[key].numpy()
            if first and np.issubdtype(value.dtype, np.floating):
                self._average[key] = value.astype(np.float64)
            elif key in self._average:
                self._average[key] = self.decay * self._average[key] + (1 - self.decay) * value.astype(np.float64)
        self._latest = arrays
        self.updates += 1

    @property
    def arrays(self) -> ArrayRecord | None:
        """The average as an ArrayRecord in the global model's keys and dtypes; None before any update."""
        if self._latest is None:
            return None
        return ArrayRecord({key: Array(self._average[key].astype(self._latest[key].numpy().dtype))
                            if key in self._average else self._latest[key] for key in self._latest.keys()})

    def state_dict(self) -> dict:
        """The average for a checkpoint: decay, update count, float64 arrays, the latest global's state dict."""
        return {"decay": self.decay, "updates": self.updates, "average": {k: v.copy() for k, v in self._average.items()},
                "latest": None if self._latest is None else {k: self._latest[k].numpy().copy()
                                                              for k in self._latest.keys()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output (the decay stays the run's)."""
        self.updates = int(state["updates"])
        self._average = {k: np.array(v, dtype=np.float64) for k, v in state["average"].items()}
        self._latest = None if state["latest"] is None else ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in state["latest"].items()})
