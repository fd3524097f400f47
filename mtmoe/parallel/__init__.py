"""Distributed set-up: process groups, the DeepSpeed config derived from the recipe, the engine."""
