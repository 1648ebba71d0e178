"""Build SFT, train SFT, then rounds of build DPO and train DPO.

    ray job submit ... -- python -m jobs.full_loop --config jobs/full_loop.yaml [key=value ...]
"""
import sys

from jobs._entry import run

SUBCOMMAND = ["loop"]  # `vpo loop`


def main(argv=None) -> int:
    return run(SUBCOMMAND, __file__, argv)


if __name__ == "__main__":
    sys.exit(main())
