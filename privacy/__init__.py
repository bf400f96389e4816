"""The mechanisms that make fedpriv private, each following its paper, knowing nothing of roles.

Owns: privacy accounting and the per-record ledger (`privacy.accountants`), DP-SGD on
Opacus primitives (`privacy.dp_sgd`), the node's secret randomness
(`privacy.secret_randomness`), SecAgg+ (`privacy.secagg`), certificates and node keys
(`privacy.provisioning`), the membership attacks, DP bounds and canaries of the audit
(`privacy.audit`), and what a node releases with what protects it (`privacy.releases`).
May import: `shared_models`. Never `client`, `server` or `simulations`.
"""
