"""Train the optimizer with DPO (Ray Train + TRL + DeepSpeed).

    ray job submit ... -- python -m jobs.train_dpo --config jobs/train_dpo.yaml [key=value ...]
"""
import sys

from jobs._entry import run

SUBCOMMAND = ["train", "dpo"]  # `vpo train dpo`


def main(argv=None) -> int:
    return run(SUBCOMMAND, __file__, argv)


if __name__ == "__main__":
    sys.exit(main())
