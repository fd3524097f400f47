"""mtmoe's benchmarks: a harness and a few benchmarks with modes, each run as `python -m benchmarks.NAME`.

`cli`, `tables` (standard library only) and `harness`, `models` (torch) are the shared parts; the
benchmarks are `family`, `step` (a package with one module per mode), `loss`, `ep`, `memory`,
`inference` and `tokenization`; the studies of quality are in `experiments/`. `render_docs` puts their
tables into the docs. Importing this package imports nothing heavy.
"""
