"""The client node: Flower ClientApp, local data loaders, one round of DP training.

- `client.client_app`: thin Flower entry points (`@app.train`, `@app.evaluate`).
- `client.config`: the run's training plan and the node's identity/budget from node-config.
- `client.node_training`: a round of training, Flower-agnostic (budget check, ledger, DP-SGD).
- `client.datasets`: loaders for the formats a hospital holds (audio, images, npz, text).
"""
