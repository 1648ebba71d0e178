"""Train the optimizer with SFT (Ray Train + TRL + DeepSpeed).

    ray job submit ... -- python -m jobs.train_sft --config jobs/train_sft.yaml [key=value ...]
"""
import sys

from jobs._entry import run

SUBCOMMAND = ["train", "sft"]  # `vpo train sft`


def main(argv=None) -> int:
    return run(SUBCOMMAND, __file__, argv)


if __name__ == "__main__":
    sys.exit(main())
