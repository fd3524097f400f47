"""`python launch/train.py ...` (also under `deepspeed` or `torchrun`): the `mtmoe-train` command.

See `mtmoe/cli/train.py`.
"""

from mtmoe.cli.train import main

if __name__ == "__main__":
    main()
