"""Multitask losses: per-task token-mean losses reduced over data-parallel ranks."""
