"""Command line: `fastproxy` (the proxy), `fastproxy --demo` (with the simulator), `sim`."""

from __future__ import annotations

import argparse
import sys

from fastproxy import __version__
from fastproxy.config import ConfigError, add_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastproxy",
        description=(
            "Bybit V5 public market data served as Mudrex WebSocket streams. "
            "Run `fastproxy sim --help` for the Bybit simulator."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fastproxy {__version__}")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="start the bundled Bybit simulator in-process and use it as the upstream (offline)",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sim"]:
        from fastproxy.sim.cli import main as sim_main

        return sim_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args).replace(demo=args.demo)
    except ConfigError as exc:
        print(f"fastproxy: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1:
        from fastproxy.supervisor import run
    else:
        from fastproxy.app import run
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
