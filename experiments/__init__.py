"""Experiments and benchmarks: central vs federated, accuracy against peers, tuning, privacy sweeps,
robustness, and what speed and memory a run costs."""
