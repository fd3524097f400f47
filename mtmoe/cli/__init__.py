"""The commands: `mtmoe-train`, `mtmoe-export`, `mtmoe-plan`, `mtmoe-report`, `mtmoe-consolidate`.

Each module sets the process defaults (`mtmoe.runtime`) on import, before torch loads, and has a `main`.
The scripts in `launch/` run the same `main`, so `deepspeed launch/train.py ...` keeps working.
"""
