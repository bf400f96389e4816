"""Every field a node sends to the coordinator, and what protects it (DESIGN 3, issue 12).

One list, read by the run report (`server.report`) and mirrored in README's release
table; `tests/test_coordinator_adversary.py` checks that a node's replies carry no field
missing from it. "Sample-level DP" means the node's (epsilon, delta) from its ledger covers
the field: it is computed from the DP-SGD output (post-processing) or from public
parameters. Fields marked "not covered" are extra releases, stated plainly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    """One field of a node's replies: its name, when it is sent, and what protects it."""

    field: str
    sent: str
    protection: str


NODE_RELEASES: tuple[Release, ...] = (
    Release("arrays (model weights)", "train reply, only without SecAgg+",
            "sample-level DP (the DP-SGD output itself); with SecAgg+ never sent, only its masked form"),
    Release("masked update y", "SecAgg+ masked-input stage",
            "uniformly masked in Z_(2^k): the server learns only the sum over >= t nodes; the sum is covered by "
            "sample-level DP, and by client-level DP when client noise is on"),
    Release("SecAgg+ public keys, encrypted shares, revealed shares", "SecAgg+ stages",
            "fresh per round; shares encrypted to their recipient (AES-GCM); never both share kinds of one node"),
    Release("SecAgg+ signatures (Ed25519)", "SecAgg+ advertise and consistency stages",
            "not covered, by design: they bind the node's round keys and the survivor set it saw to its "
            "provisioned key; a function of public values only"),
    Release("update-norm", "train reply, with SecAgg+ and no client-level noise",
            "sample-level DP (a function of the DP-SGD output); not hidden by SecAgg+, and never sent when "
            "client-level noise is on"),
    Release("num-examples", "train reply", "not covered: the training record count is public metadata"),
    Release("epsilon, delta, max-epsilon, steps-total", "train reply (DP runs)",
            "not covered: the ledger's state, a function of public parameters and of which records were charged "
            "before (public metadata)"),
    Release("noise-multiplier, sample-rate, round-steps", "train reply",
            "not covered: functions of the run's public plan and the record count"),
    Release("privacy-unit, num-groups", "train reply (num-groups: patient-level DP runs)",
            "not covered: what the node's epsilon is about (\"record\", \"patient\", \"user\"), the site's choice; "
            "the number of groups (patients) it trains, public metadata like the record count"),
    Release("declined, reason", "train reply", "not covered: says that some training record would pass the budget"),
    Release("refused, reason", "train reply", "not covered: the site's policy, which the site chooses to state"),
    Release("failed, error", "train reply",
            "not covered: that the round failed, and the exception's type; its message only for a run-config the "
            "node refused or in simulations (a deployed node keeps other messages in its log). Non-finite "
            "per-sample gradients are zeroed before clipping, so a record cannot be made to fail a round"),
    Release("val-loss, val-accuracy, val-auc, num-val-examples", "train and evaluate replies, only when the "
            "site keeps a validation share (fedpriv node --val-fraction; simulations: --val-fraction)",
            "not covered: computed without noise on the validation records, which are never trained on; off by "
            "default on deployed nodes"),
    Release("label-counts, label-count-noise", "train reply, once per run id: the first round a node trains, when "
            "the run asks (--label-count-share > 0), the unit is the record and no client-level noise is on",
            "sample-level DP: each class's count of the training records plus Gaussian noise of std "
            "label-count-noise (secret entropy; sensitivity 1), charged to every training record in the ledger "
            "and inside the run's epsilon (privacy.label_counts; a coordinator that sends another run id gets another "
            "release, charged again); the std is a function of the public plan"),
    Release("name", "every reply", "not covered: the site's name from its kit"),
)
