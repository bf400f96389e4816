"""The client node's role: the ClientApp, the site's policy, one round of DP training, `fedpriv node`.

Owns: the Flower entry points (`client.client_app`), the node-config policy and identity
(`client.config`), a round of training, Flower-agnostic (`client.node_training`: budget
check, ledger charge, DP-SGD), the node's side of SecAgg+ over Flower messages
(`client.secure_aggregation`), simulated faults (`client.faults`), the SuperNode a site
starts (`client.supernode`), which app bundles it runs (`client.app_approval`) and its audit
log of every reply (`client.audit_log`, `fedpriv log`).
May import: `privacy`, `shared_models`. Never `server` (the other role) or `simulations`.
"""
