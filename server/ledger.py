"""The coordinator's privacy ledger: what every node reported, round by round.

Nodes are the source of truth for their own sample-level epsilon (their ledgers persist
on their disks); the coordinator records what each reply said, plus the rounds each node
declined or failed, so the run's summary and report can show every node's budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class NodeRecord:
    """One node's standing in this run. epsilon is at `delta`; None until it reports."""

    epsilon: float | None = None
    delta: float | None = None
    max_epsilon: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int = 0
    num_examples: int = 0
    rounds_trained: list[int] = field(default_factory=list)
    declined_rounds: list[int] = field(default_factory=list)
    declines: list[dict] = field(default_factory=list)  # {"round": int, "reason": str}: what the node said
    refused_rounds: list[int] = field(default_factory=list)  # the site's policy refused the run
    refusals: list[dict] = field(default_factory=list)  # {"round": int, "reason": str}
    failed_rounds: list[int] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"round": int, "error": str}
    epsilon_by_round: dict[str, float] = field(default_factory=dict)
    # What the node's epsilon is about: "record", or a group unit ("patient", "user") under
    # user-level DP-SGD (issue 19); None until it reports. num_groups: its training groups.
    privacy_unit: str | None = None
    num_groups: int | None = None
    # The node's one DP release of its label counts this run (`privacy.label_counts`), as sent:
    # (K,) noisy counts and their std; None when it sent none.
    label_counts: list[float] | None = None
    label_count_noise: float | None = None


class CoordinatorLedger:
    """Per-node records keyed by the node's name (as it reports itself)."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        # Client-level DP of the released aggregates (secure aggregation only): epsilon at
        # delta, noise multiplier, sampling rate, rounds released.
        self.client_level: dict = {}

    def _node(self, name: str) -> NodeRecord:
        return self.nodes.setdefault(name, NodeRecord())

    def record_reply(self, name: str, server_round: int, metrics: dict[str, float], declined: bool,
                     reason: str = "", unit: str | None = None) -> None:
        """Record a train reply's metrics (keys as sent by `client.client_app.train`).

        reason: for a declined round, why the node declined (its reply's `node.reason`, e.g.
        "training would reach epsilon=9.1 > max-epsilon=8 ..."); kept in `declines`.
        unit: the reply's `node.privacy-unit` (None from a node that does not say: "record").
        """
        rec = self._node(name)
        if "epsilon" in metrics:
            rec.privacy_unit = unit or "record"
        if "num-groups" in metrics:
            rec.num_groups = int(metrics["num-groups"])
        if "epsilon" in metrics:
            rec.epsilon = float(metrics["epsilon"])
            rec.delta = float(metrics["delta"])
            rec.max_epsilon = float(metrics["max-epsilon"])
            rec.noise_multiplier = float(metrics["noise-multiplier"])
            rec.sample_rate = float(metrics["sample-rate"])
            rec.steps = int(metrics["steps-total"])
            rec.epsilon_by_round[str(server_round)] = rec.epsilon
        if "label-counts" in metrics:  # kept only when well-formed: one node's bad reply never stops the run
            try:
                rec.label_counts = [float(c) for c in metrics["label-counts"]]
                rec.label_count_noise = float(metrics.get("label-count-noise", float("nan")))
            except (TypeError, ValueError):
                rec.label_counts, rec.label_count_noise = None, None
        rec.num_examples = int(metrics.get("num-examples", rec.num_examples))
        (rec.declined_rounds if declined else rec.rounds_trained).append(server_round)
        if declined:
            rec.declines.append({"round": server_round, "reason": reason or "declined (no reason given)"})

    def record_refusal(self, name: str, server_round: int, reason: str) -> None:
        """A node whose owner's policy refused `server_round` (e.g. "DP is required by the site")."""
        rec = self._node(name)
        rec.refused_rounds.append(server_round)
        rec.refusals.append({"round": server_round, "reason": reason})

    def record_failure(self, name: str, server_round: int, error: str) -> None:
        """A node that raised, timed out or sent an invalid reply in `server_round`."""
        rec = self._node(name)
        if server_round not in rec.failed_rounds:
            rec.failed_rounds.append(server_round)
        rec.failures.append({"round": server_round, "error": error})

    def merge_alias(self, alias: str, name: str) -> None:
        """Fold the record kept under `alias` into `name`'s.

        A node that fails before it ever replied is known only by its Flower node id
        (`node-id-<id>`); once it names itself, its earlier failures join its own record so
        one node never shows up as two.
        """
        if alias == name or alias not in self.nodes:
            return
        old = self.nodes.pop(alias)
        rec = self._node(name)
        rec.failed_rounds = sorted(set(rec.failed_rounds) | set(old.failed_rounds))
        rec.failures = sorted(old.failures + rec.failures, key=lambda f: f["round"])

    @classmethod
    def from_dict(cls, nodes: dict[str, dict], client_level: dict | None = None) -> CoordinatorLedger:
        """Inverse of `to_dict` (plus the client-level record), for resuming from a checkpoint."""
        ledger = cls()
        ledger.nodes = {name: NodeRecord(**rec) for name, rec in nodes.items()}  # older checkpoints: fields default
        ledger.client_level = dict(client_level or {})
        return ledger

    def to_dict(self) -> dict[str, dict]:
        """Node name -> its NodeRecord as a JSON-ready dict, sorted by name."""
        return {name: asdict(rec) for name, rec in sorted(self.nodes.items())}
