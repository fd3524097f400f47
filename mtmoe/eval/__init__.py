"""Held-out evaluation: per-task losses, expert utilization, reports."""
