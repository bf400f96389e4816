"""The coordinator: Flower ServerApp, the FedAvg round loop, the privacy ledger, run outputs.

- `server.server_app`: thin Flower entry point (`@app.main`).
- `server.federation`: rounds over Flower's Grid: sample, send, sort replies, aggregate, evaluate.
- `server.ledger`: what every node reported (epsilon, declines, failures).
- `server.run_folder`, `server.summary`: the run folder, summary.json and report.md.
"""
