"""`python launch/plan.py ...` (also under `deepspeed` or `torchrun`): the `mtmoe-plan` command.

See `mtmoe/cli/plan.py`.
"""

from mtmoe.cli.plan import main

if __name__ == "__main__":
    main()
