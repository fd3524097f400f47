"""`python launch/consolidate.py ...` (also under `deepspeed` or `torchrun`): the `mtmoe-consolidate` command.

See `mtmoe/cli/consolidate.py`.
"""

from mtmoe.cli.consolidate import main

if __name__ == "__main__":
    main()
