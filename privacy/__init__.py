"""Everything that makes fedpriv private.

- `privacy.accountants`: sample-level DP accounting (RDP) and each node's persisted ledger.
- `privacy.dp_sgd`: DP-SGD training sessions on Opacus (make_private once per process).
"""
