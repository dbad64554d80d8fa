"""The ``redact`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.cli import add_file_parser, list_categories


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redact",
        description="Self-hosted redaction of faces in photos, videos and (soon) live streams.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_file_parser(sub)
    cats = sub.add_parser("categories", help="list the categories, their models and licences")
    cats.set_defaults(func=list_categories)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
