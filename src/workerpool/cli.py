"""The ``workerpool`` command."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="workerpool",
        description="Serve ML models from worker processes that share one copy of the weights.")
    parser.add_argument("--version", action="version", version=f"workerpool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="start a pool on a built-in model and show its memory",
                        add_help=False)
    commands.add_parser("serve", help="serve models over HTTP (KServe v2); no model: a demo",
                        add_help=False)
    commands.add_parser("score", help="score a file (parquet, csv, jsonl, npy) with a model: "
                        "streamed, resumable", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from . import demo

        return demo.main(rest)
    if args.command == "serve":
        from .serve.main import main as serve

        return serve(rest)
    if args.command == "score":
        from .scoring.main import main as score

        return score(rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
