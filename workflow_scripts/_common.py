"""Shared set-up of every rule script: the library on sys.path and logging into the rule's log file."""

import logging
import signal
import sys
from pathlib import Path

# Rule scripts run in conda envs that need not have the package installed: it lives beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def setup(snakemake) -> logging.Logger:
    """Send logging (and warnings) of the library to the rule's log file; return the rule's logger.

    An error that stops the job is logged with its traceback in the rule's log and shown on stderr as one
    line. SIGTERM (Snakemake stopping its jobs, a cluster cancelling one) unwinds like Ctrl-C, so that the
    temporary files of the atomic writers are removed.
    """
    logging.basicConfig(
        filename=snakemake.log[0],
        filemode="w",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.captureWarnings(True)
    wildcards = dict(snakemake.wildcards.items())
    job = " ".join([snakemake.rule, *(f"{k}={v}" for k, v in wildcards.items())])
    sys.excepthook = _error_hook(job, snakemake.log[0])
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    log = logging.getLogger(f"rule.{snakemake.rule}")
    log.info("rule %s %s", snakemake.rule, wildcards or "")
    return log


def _error_hook(job: str, log_path: str):
    def log_uncaught(exc_type, exc, tb) -> None:
        """Put the error that stops a job into its log with the traceback, and one line on stderr."""
        logging.getLogger("rule").error(
            "%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb)
        )
        logging.shutdown()
        if issubclass(exc_type, KeyboardInterrupt):
            print(f"{job}: interrupted", file=sys.stderr)
            return
        text = " ".join(str(exc).split()) or exc_type.__name__
        if exc_type.__name__ != "InputError":
            text = f"{exc_type.__name__}: {text}"
        print(f"{job}: error: {text} (traceback in {log_path})", file=sys.stderr)

    return log_uncaught


def _exit_on_sigterm(signum, frame) -> None:
    logging.getLogger("rule").warning("stopped by signal %d (SIGTERM)", signum)
    raise SystemExit(128 + signum)
