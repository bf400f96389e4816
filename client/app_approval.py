"""A deployed node runs only a ClientApp its owner approved (issue 15; DESIGN: the node is the trust anchor).

Adversary: a lying coordinator that submits, with `flwr run`, a Flower App bundle (FAB)
whose ClientApp skips the ledger charge, DP-SGD or the SecAgg+ masking. Every guarantee
the node enforces lives in the ClientApp's code, so the node must refuse to run code it has
not approved. Flower 1.42's SuperNode cannot say no to a private federation's FAB (its
`--trusted-entities` only checks Flower Hub's verification records), so fedpriv adds the
smallest hook on the SuperNode / ClientApp process boundary:

- `fedpriv node` starts `flower-supernode --isolation process` and, beside it, Flower's
  own SuperExec (`superexec_main`) with one change: the process it starts for a ClientApp
  task is `fedpriv-clientapp` (`clientapp_main`) instead of `flwr-clientapp`.
- `fedpriv-clientapp` is Flower 1.42's `run_clientapp` with two of its module's names
  wrapped: `install_from_fab` hashes the FAB bytes it received (SHA-256, computed here, never
  the hash the SuperLink announces) and installs them only when the hash is approved;
  `get_load_client_app_fn` loads the installed app only for that approved hash, and
  otherwise returns `refusal_app`, the node's own code, which answers every message with a
  refusal naming the hash received and the hashes the site accepts. Nothing from an
  unapproved bundle is written to disk, imported or run; runtime dependency installation
  is always off.

Approved by default: the FAB of the fedpriv installed on the node (`fab_sha256`); more with
`fedpriv node --approve SHA256` (passed to these processes in `APPROVED_ENV`). The hooks
are pinned to flwr `FLWR_VERSION`: with any other Flower the ClientApp process refuses to
start (its task fails) rather than run an unchecked app.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import flwr
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import audit_log
from shared_models.app_bundle import fab_sha256

FLWR_VERSION = "1.42.0"  # the Flower whose run_clientapp / SuperExec internals the hooks wrap
APPROVED_ENV = "FEDPRIV_APPROVED_APPS"  # comma-separated extra FAB SHA-256 hashes (`fedpriv node --approve`)
CLIENTAPP_SCRIPT = "fedpriv-clientapp"
_SHA256 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger("fedpriv.app_approval")


class ApprovalError(ValueError):
    """An approved-app hash is malformed, or the installed Flower is not the one the hooks are pinned to."""


def parse_hashes(values) -> list[str]:
    """Lower-cased FAB SHA-256 hashes from `--approve` values or `APPROVED_ENV` (comma-separated allowed).

    Raises ApprovalError naming a value that is not 64 hex digits.
    """
    hashes = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip().lower()
            if not item:
                continue
            if not _SHA256.fullmatch(item):
                raise ApprovalError(f"--approve {item!r}: expected a FAB SHA-256 hash (64 hex digits)")
            hashes.append(item)
    return hashes


def approved_hashes(extra=()) -> list[str]:
    """The FAB hashes this node accepts: its own fedpriv's first, then `extra` and `APPROVED_ENV`'s."""
    own = fab_sha256()
    others = parse_hashes([*extra, os.environ.get(APPROVED_ENV, "")])
    return [own, *[h for h in dict.fromkeys(others) if h != own]]


def refusal_reason(received: str, approved: list[str]) -> str:
    """What the coordinator reads when its app is refused: the hash sent and what the site expects."""
    extra = f" or one of {', '.join(h[:12] for h in approved[1:])}" if len(approved) > 1 else ""
    return (f"app not approved by the site: the submitted app bundle has SHA-256 {received}; this site runs "
            f"only fedpriv's own app (SHA-256 {approved[0]}){extra}. Submit the unchanged fedpriv app of the "
            f"site's version, or ask the site to approve this hash (fedpriv node --approve)")


def refusal_app(reason: str) -> ClientApp:
    """A ClientApp of the node's own code that answers every train, evaluate and SecAgg+ message
    with `metrics.refused = 1` and `node.reason = reason` (what `server.federation` records as
    a site's refusal), and writes each answer to the node's audit log."""
    from client.secure_aggregation import STAGES

    app = ClientApp(mods=[audit_log.audit_mod])

    def refuse(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict({
            "metrics": MetricRecord({"refused": 1}),
            "node": ConfigRecord({"name": str(context.node_config.get("node-name", "node")), "reason": reason}),
        }), reply_to=msg)

    app.train()(refuse)
    app.evaluate()(refuse)
    app.query()(refuse)
    for stage in STAGES:
        app.query(stage)(refuse)
    return app


def require_pinned_flower() -> None:
    """Raise ApprovalError unless the installed Flower is FLWR_VERSION, the one the hooks wrap."""
    if flwr.__version__ != FLWR_VERSION:
        raise ApprovalError(f"fedpriv's app approval is pinned to flwr {FLWR_VERSION}; this node has flwr "
                            f"{flwr.__version__}: install flwr=={FLWR_VERSION}")


@dataclass
class Gate:
    """The verdict on the FAB this ClientApp process received (one task per process)."""

    approved: list[str]
    received: str | None = None
    refusal: str | None = None
    installed: list[str] = field(default_factory=list)


def install_hooks(module, approved: list[str]) -> Gate:
    """Wrap `install_from_fab` and `get_load_client_app_fn` in Flower's run_clientapp `module`.

    Returns the Gate the wrappers fill in. Raises ApprovalError when the installed Flower is
    not FLWR_VERSION (the wrapped names and their call order are those of that version).
    """
    require_pinned_flower()
    gate = Gate(approved=approved)
    install, loader_factory = module.install_from_fab, module.get_load_client_app_fn

    def checked_install(fab_file, *args, **kwargs):
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        gate.received = hashlib.sha256(content).hexdigest()
        if gate.received not in gate.approved:
            gate.refusal = refusal_reason(gate.received, gate.approved)
            log.warning("refusing app bundle %s: not approved", gate.received)
            return None
        gate.installed.append(gate.received)
        return install(content, *args, **kwargs)

    def checked_loader_factory(*args, **kwargs):
        load = loader_factory(*args, **kwargs)

        def checked_load(fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
            if gate.refusal is None and fab_hash not in gate.installed:  # announced hash != bytes checked
                gate.refusal = refusal_reason(f"{gate.received} (announced as {fab_hash or 'none'})", gate.approved)
            if gate.refusal is not None:
                return refusal_app(gate.refusal)
            return load(fab_id, fab_version, fab_hash)

        return checked_load

    module.install_from_fab = checked_install
    module.get_load_client_app_fn = checked_loader_factory
    return gate


def clientapp_main() -> None:
    """`fedpriv-clientapp`: Flower's `flwr-clientapp` (same arguments) behind the approval gate."""
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as flower

    args = _parse_args_run_flwr_clientapp().parse_args()
    token = try_obtain_flwr_app_token(args)
    try:
        install_hooks(flower, approved_hashes())
    except ApprovalError as err:
        sys.exit(f"fedpriv-clientapp: {err}")
    flower.run_clientapp(
        runtime_api_address=args.runtime_api_address, token=token, insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,  # an app's dependencies would run code nobody approved
    )


def superexec_main() -> None:
    """Flower's `flower-superexec` (same arguments) whose ClientApp tasks start `fedpriv-clientapp`.

    Started by `fedpriv node` as `python -m client.app_approval ARGS`.
    """
    from flwr.supercore import constant
    from flwr.supercore.cli.flower_superexec import flower_superexec

    from shared_models.flower_processes import console_script

    try:
        require_pinned_flower()
    except ApprovalError as err:
        sys.exit(f"fedpriv: {err}")
    script = console_script(CLIENTAPP_SCRIPT)
    if not Path(script).is_absolute():
        sys.exit(f"fedpriv: {CLIENTAPP_SCRIPT} is not installed beside {sys.executable}; reinstall fedpriv")
    constant.TASK_TYPE_TO_COMMAND[constant.TaskType.CLIENT_APP] = script
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    superexec_main()
