"""Experiments across runs: hyperparameter sweeps on Optuna."""
