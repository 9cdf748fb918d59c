"""`python -m training.train --config CONFIG.yaml [key=value ...]`: meta-learning."""

from __future__ import annotations

import argparse
import logging
import sys

from training.config import load_config
from training.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file (training/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=100 data.k=4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(train(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
