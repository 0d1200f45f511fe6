"""The run layer: what ClientApp, ServerApp and the runners share about one run.

Its settings (RunConfig), the message schema, the builders from settings to data and
model objects, and the run directory. It sits above `models/` and `datasets/` (it reads
their choice lists and defaults) and below `client/`, `server/` and `simulations/`.
"""
