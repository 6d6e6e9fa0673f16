"""The ``virtual-contrast`` command line: one subcommand per workflow step, working on files.

Each area of the library contributes its subcommands through an ``add_commands(subparsers)`` function, so
that this file stays a table of contents.

Errors reach the user as one line on stderr, never as a Python traceback: a problem with the arguments or the
input files (an :class:`~virtual_contrast.io.InputError`, or a usage error) exits with status 2, an unexpected
failure with status 1, an interruption (Ctrl-C) with 130. The traceback of every error is saved for
developers in :func:`error_log_dir` (``$VIRTUAL_CONTRAST_LOG_DIR``, else ``$XDG_STATE_HOME/virtual-contrast``,
else ``~/.local/state/virtual-contrast``), one file per failure, the newest :data:`KEPT_ERROR_LOGS` kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

from virtual_contrast import __version__
from virtual_contrast.io import InputError

COMMAND_MODULES = (
    "virtual_contrast.cohort.commands",
    "virtual_contrast.preprocess.commands",
    "virtual_contrast.model.commands",
    "virtual_contrast.evaluate.commands",
    "virtual_contrast.reader.commands",
    "virtual_contrast.dicom.commands",
)

#: Exit status of a problem with the arguments or the inputs (as argparse uses for usage errors).
EXIT_INPUT_ERROR = 2
#: Exit status of an unexpected failure (a bug, or a problem no check foresaw).
EXIT_FAILURE = 1
#: Number of saved tracebacks kept in the error log folder.
KEPT_ERROR_LOGS = 50

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line that points at ``--help`` (instead of the usage text)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="virtual-contrast",
        description="Virtual contrast-enhanced T1 MRI: preprocessing, model, evaluation, reader study.",
        epilog="Errors are one line on stderr; exit status 2 for bad arguments or inputs, 1 for an unexpected "
        f"failure. Tracebacks are saved in {error_log_dir()} (set VIRTUAL_CONTRAST_LOG_DIR to change it).",
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
    program = f"virtual-contrast {args.command}"
    try:
        _check_common_arguments(args)
        return int(args.func(args) or 0)
    except InputError as exc:
        return report_error(program, exc, argv)
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else is still one line, with the traceback saved
        return report_error(program, exc, argv)


def _check_common_arguments(args: argparse.Namespace) -> None:
    """Checks shared by every subcommand, before it runs: a subject id must be a valid id (as in the
    workflow), since it becomes part of output file names."""
    from virtual_contrast.subjects import check_subject_id

    subject = getattr(args, "subject", None)
    if subject is not None:
        try:
            check_subject_id(subject)
        except InputError as exc:
            raise InputError(f"--subject: {exc.reason}", subject=subject) from None


def report_error(program: str, exc: BaseException, argv: list[str] | None = None) -> int:
    """Print ``exc`` as one line on stderr, save its traceback, and return the exit status.

    An :class:`InputError` is the user's to fix: the line is its message and the status
    :data:`EXIT_INPUT_ERROR`. Anything else is unexpected: the line names the exception type and where its
    traceback was saved, and the status is :data:`EXIT_FAILURE`.
    """
    saved = save_traceback(program, exc, argv)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, InputError):
        print(f"{program}: error: {text}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    where = f"traceback in {saved}" if saved else "traceback could not be saved"
    print(f"{program}: error: {type(exc).__name__}: {text} (unexpected; {where})", file=sys.stderr)
    return EXIT_FAILURE


def error_log_dir() -> Path:
    """Folder of the saved tracebacks (see the module docstring)."""
    if os.environ.get("VIRTUAL_CONTRAST_LOG_DIR"):
        return Path(os.environ["VIRTUAL_CONTRAST_LOG_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "virtual-contrast"


def save_traceback(program: str, exc: BaseException, argv: list[str] | None = None) -> Path | None:
    """Write the command line and the traceback of ``exc`` to a new file; its path, or None if impossible."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{program.replace(' ', '-')}-{stamp}-{os.getpid()}.log"
    command = " ".join(sys.argv[:1] + (argv if argv is not None else sys.argv[1:]))
    text = (
        f"{program} (virtual_contrast {__version__}), {dt.datetime.now().isoformat()}\n"
        f"command: {command}\n\n" + "".join(traceback.format_exception(exc))
    )
    for folder in (
        error_log_dir(),
        Path(tempfile.gettempdir()) / f"virtual-contrast-{os.getuid()}",
    ):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text)
        except OSError:
            continue
        _prune(folder)
        log.debug("traceback saved in %s", path)
        return path
    return None


def _prune(folder: Path) -> None:
    def age(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another process
            return 0.0

    logs = sorted(folder.glob("virtual-contrast-*.log"), key=age)
    for old in logs[:-KEPT_ERROR_LOGS]:
        old.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
