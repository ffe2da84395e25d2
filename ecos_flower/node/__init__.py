"""The warm node worker and the thin relay ClientApp.

A Flower 1.39 SuperNode starts a fresh `flwr-clientapp` process for every message, and that
process imports the app the *server* shipped. With a node worker, the node operator starts one
long-lived process (`ecos-flower node-worker`) that holds torch, the node's data, its policy and
its ledger; the ClientApp the server ships only relays each message to it over a local Unix
socket. So the privacy-critical code and the data live in an operator-installed process, and a
message costs a flwr import plus the work, not a torch import.

`wire` is the framing (standard library + flwr only), `relay` the ClientApp side (no torch),
`worker` the operator's process.
"""
