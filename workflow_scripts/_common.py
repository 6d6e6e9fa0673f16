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
    wildcards = dict(snakemake.wildcards.items())
    log = logging.getLogger(f"rule.{snakemake.rule}")
    log.info("rule %s %s", snakemake.rule, wildcards or "")
    return log
