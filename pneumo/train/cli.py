"""`pneumo train DATA [--config recipe.yaml] [--flags]`: the options are checked before Ray or torch start.

The flags are `pneumo.train.config.TrainConfig`'s; the run is `pneumo.train.driver.run`.
"""

from __future__ import annotations

import sys

from pneumo.config import ConfigError, parse_config
from pneumo.data.listing import DataError
from pneumo.train.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    """Parse and check the options, then run the training job."""
    cfg = parse_config(TrainConfig, argv, prog="pneumo train")
    # start-up time: Ray and torch only once the options are good
    from pneumo.train.driver import run

    try:
        run(cfg)
    except (ConfigError, DataError) as exc:
        print(f"pneumo train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
