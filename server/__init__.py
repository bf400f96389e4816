"""The coordinator's role: the ServerApp, the FedAvg round loop, its ledger, the run folder and report, `fedpriv server`.

Owns: the Flower entry point (`server.server_app`), rounds over Flower's Grid
(`server.federation`: sample, send, sort replies, aggregate, evaluate), the server's side of
SecAgg+ over Flower messages (`server.secure_aggregation`, `server.messaging`), what every
node reported (`server.ledger`), the run folder, summary.json and report.md
(`server.run_folder`, `server.summary`), the HTML run report (`server.report`), and the
SuperLink with its Fleet-only TLS gateway (`server.superlink`, `server.fleet_gateway`).
May import: `privacy`, `shared_models`. Never `client` (the other role) or `simulations`.
"""
