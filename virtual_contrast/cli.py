"""The ``virtual-contrast`` command line: one subcommand per workflow step, working on files.

Each area of the library contributes its subcommands through an ``add_commands(subparsers)`` function, so
that this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from virtual_contrast import __version__
from virtual_contrast.io import InputError

COMMAND_MODULES = (
    "virtual_contrast.cohort",
    "virtual_contrast.preprocess.commands",
    "virtual_contrast.model.commands",
    "virtual_contrast.evaluate.commands",
    "virtual_contrast.reader.commands",
    "virtual_contrast.dicom.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtual-contrast",
        description="Virtual contrast-enhanced T1 MRI: preprocessing, model, evaluation, reader study.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"virtual-contrast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
