"""Shared set-up of every rule script: the library on sys.path and logging into the rule's log file."""

import logging
import sys
from pathlib import Path

# Rule scripts run in conda envs that need not have the package installed: it lives beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def setup(snakemake) -> logging.Logger:
    """Send logging (and warnings) of the library to the rule's log file; return the rule's logger."""
    logging.basicConfig(
        filename=snakemake.log[0],
        filemode="w",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    wildcards = dict(snakemake.wildcards.items())
    log = logging.getLogger(f"rule.{snakemake.rule}")
    log.info("rule %s %s", snakemake.rule, wildcards or "")
    return log


def _log_uncaught(exc_type, exc, tb) -> None:
    """Put the error that stops a job into its log too (Snakemake shows the log path to the user)."""
    logging.getLogger("rule").error("%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))
    sys.__excepthook__(exc_type, exc, tb)
