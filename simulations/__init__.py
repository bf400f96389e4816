"""One-machine federations: named datasets, partitioning, and `fedpriv simulate`.

- `simulations.datasets`: digits (embedded), fsdd, pneumoniamnist, sms_spam, local paths.
- `simulations.partitioning`: IID / Dirichlet / natural splits via flwr-datasets.
- `simulations.runner`: a private SuperLink in simulation mode + `flwr run`.
- `simulations.cli`: the `fedpriv` command.
"""
