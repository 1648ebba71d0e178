"""Build the SFT set (rewrite, critique, refine) with Ray Data.

    ray job submit ... -- python -m jobs.build_sft --config jobs/build_sft.yaml [key=value ...]
"""
import sys

from jobs._entry import run

SUBCOMMAND = ["generate", "sft"]  # `vpo generate sft`


def main(argv=None) -> int:
    return run(SUBCOMMAND, __file__, argv)


if __name__ == "__main__":
    sys.exit(main())
