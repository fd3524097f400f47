"""mtmoe's benchmarks: a harness and a few benchmarks with modes, each run as `python -m benchmarks.NAME`.

`cli`, `tables` (standard library only) and `harness`, `models` (torch) are the shared parts; the
benchmarks are `family`, `step` (a package with one module per mode), `loss`, `ep`, `memory` and
`inference`, plus the `quality_study`. `render_docs` puts their tables into the docs. Importing this
package imports nothing heavy.
"""
