"""`fedpriv audit RUN_DIR`: the audit harness over a finished simulated run.

- `audit`: rebuild the run's members and non-members, attack the final model, compare with the bound.
- `shadows`: shadow federations (or central shadows) trained like the run, for LiRA.
- `command`: the CLI command.
The attacks and bounds themselves are `privacy.audit`.
"""

from .audit import AuditError, audit_run

__all__ = ["AuditError", "audit_run"]
