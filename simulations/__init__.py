"""One-machine runs and the command line on top of everything.

Owns: `fedpriv simulate` on Flower's simulation engine (`simulations.runner`: a private
SuperLink in simulation mode + `flwr run`, with a progress bar), the `fedpriv` CLI
(`simulations.cli`, with the options `simulate` and `run` share in
`simulations.cli_options`), `fedpriv run` for a deployed federation
(`simulations.deployed_run`), and the audit harness that trains shadow federations
(`simulations.audit`).
May import: every other package (`client`, `server`, `privacy`, `shared_models`).
"""
