"""Build the DPO set (text and video pairs) with Ray Data.

    ray job submit ... -- python -m jobs.build_dpo --config jobs/build_dpo.yaml [key=value ...]
"""
import sys

from jobs._entry import run

SUBCOMMAND = ["generate", "dpo"]  # `vpo generate dpo`


def main(argv=None) -> int:
    return run(SUBCOMMAND, __file__, argv)


if __name__ == "__main__":
    sys.exit(main())
