"""A stand-in for another layer's CLI module (registered through cli.LAZY_SUBCOMMANDS)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("hello", help="say hello")
    parser.add_argument("--code", type=int, default=0)
    parser.set_defaults(func=_hello)


def _hello(args: argparse.Namespace) -> int:
    print("hello from a lazy subcommand")
    return int(args.code)
