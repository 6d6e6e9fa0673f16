"""What a training run reports as it goes: ``train_log.tsv`` (one row per epoch) and ``loss_curve.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from virtual_contrast.io import atomic_path, write_table
from virtual_contrast.layout import MODEL_FILES

LOG_COLUMNS = ["epoch", "train_loss", "tune_loss", "seconds", "lr", "best"]


def write_loss_curve(history: list[dict], path: Path | str, title: str = "") -> Path:
    """Plot train and tuning loss per epoch (log scale), marking the selected epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if history:
        df = pd.DataFrame(history)
        ax.plot(df["epoch"], df["train_loss"], label="train")
        tune = df.dropna(subset=["tune_loss"])
        if len(tune):
            ax.plot(tune["epoch"], tune["tune_loss"], label="tuning")
            best = df[df["best"]]
            if len(best):
                last = best.iloc[-1]
                ax.axvline(
                    last["epoch"],
                    color="grey",
                    ls=":",
                    label=f"selected (epoch {int(last['epoch'])})",
                )
        positive = df[["train_loss", "tune_loss"]].to_numpy(dtype=float)
        if np.nanmin(positive) > 0:
            ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("L2 loss (mean squared error)")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def write_log(history: list[dict], path: Path) -> None:
    df = pd.DataFrame(history, columns=LOG_COLUMNS)
    write_table(df, path)


def write_outputs(history: list[dict], out_dir: Path, title: str) -> None:
    write_log(history, out_dir / MODEL_FILES["log"])
    write_loss_curve(history, out_dir / MODEL_FILES["curve"], title=title)
