"""`python launch/export.py ...` (also under `deepspeed` or `torchrun`): the `mtmoe-export` command.

See `mtmoe/cli/export.py`.
"""

from mtmoe.cli.export import main

if __name__ == "__main__":
    main()
