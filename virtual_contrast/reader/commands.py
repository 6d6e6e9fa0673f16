"""Command-line subcommands of this area (registered by virtual_contrast.cli)."""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands."""
