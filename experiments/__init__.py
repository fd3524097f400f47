"""Experiments: studies whose configs are data (a YAML file next to each): `python -m experiments.NAME`.

`balance_study` trains the demo under each multitask-balancing scheme; `export_comparison` folds a trained
run with every merge method and pruning level. They share the benchmarks' command-line pieces and timing
harness (`benchmarks.cli`, `benchmarks.harness`).
"""
