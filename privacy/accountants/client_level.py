"""Client-level DP accounting for distributed-noise secure aggregation (DESIGN 4.2).

Each aggregated round releases sum_{u in U3} clip_C(delta_u) + N(0, s^2) with s >= sigma*C
(every client adds N(0, (sigma*C)^2 / n_min) and U3 has >= n_min honest members), so with respect
to one client's whole update the round is a Gaussian mechanism of noise multiplier sigma.
Rounds compose as a subsampled Gaussian with q = P(a client is sampled in a round) only
when the sample is Poisson and secret from whoever the guarantee is against (McMahan et al.
2018, "Learning differentially private recurrent language models"). fedpriv's server picks
and logs the sample, so `server.federation` always steps with q = 1.
The noise multiplier is what honest survivors carry: with up to c survivors colluding with
the server (they know their own noise), each client adds N(0, (sigma*C)^2 / (t - c)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sample_level import HistoryEntry, compose_history, epsilon_for_history


@dataclass
class ClientLevelAccountant:
    """RDP history of aggregated rounds; epsilon at `delta` (which must be < 1/#clients)."""

    delta: float
    history: list[HistoryEntry] = field(default_factory=list)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one released aggregate."""
        self.history = compose_history(self.history, noise_multiplier, sample_rate, 1)

    def epsilon(self) -> float:
        """Client-level epsilon so far (inf when the noise multiplier is 0)."""
        return epsilon_for_history(self.history, self.delta)
