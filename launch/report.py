"""`python launch/report.py ...` (also under `deepspeed` or `torchrun`): the `mtmoe-report` command.

See `mtmoe/cli/report.py`.
"""

from mtmoe.cli.report import main

if __name__ == "__main__":
    main()
