"""Command-line subcommands of this area (registered by virtual_contrast.cli): split, train, predict."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from virtual_contrast.io import InputError, write_table
from virtual_contrast.layout import (
    UNCERTAINTY_CALIBRATION_NAME,
    atlas_dir,
    brain_mask_name,
    normalized_name,
)
from virtual_contrast.model.config import UNET_OUTPUTS
from virtual_contrast.preprocess.commands import BACKENDS, HDBET_MODES

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands."""
    from virtual_contrast.config import schema_defaults

    defaults = schema_defaults()
    _add_split(subparsers, defaults)
    _add_train(subparsers)
    _add_predict(subparsers, defaults)


# --- split -----------------------------------------------------------------------------------------------


def _add_split(subparsers: argparse._SubParsersAction, defaults: dict) -> None:
    p = subparsers.add_parser(
        "split",
        help="assign the training subjects to K cross-validation folds",
        description="Write a folds TSV (subject, fold) for the split == 'train' rows of a subjects table "
        "(columns subject, split, optional stratum). With --previous, subjects already assigned keep "
        "their fold and only new subjects are dealt.",
    )
    p.add_argument("--subjects", type=Path, required=True, help="subjects TSV")
    p.add_argument(
        "--k",
        type=int,
        default=defaults["split"]["folds"],
        help="number of folds (default: %(default)s, the config's split.folds; the paper: 5)",
    )
    p.add_argument(
        "--seed", type=int, default=defaults["split"]["seed"], help="default: %(default)s"
    )
    p.add_argument("--previous", type=Path, help="an earlier folds TSV to keep stable")
    p.add_argument("--out", type=Path, required=True, help="folds TSV to write")
    p.set_defaults(func=_run_split)


def _run_split(args: argparse.Namespace) -> int:
    from virtual_contrast.model.folds import make_folds, read_folds
    from virtual_contrast.subjects import check_split_column

    if not args.subjects.exists():
        raise InputError("subjects table not found", path=args.subjects)
    subjects = pd.read_csv(args.subjects, sep="\t", dtype={"subject": str})
    # A typo such as "tset" must stop here, naming the row: it would otherwise never reach a test fold.
    subjects = check_split_column(subjects, source=args.subjects)
    previous = read_folds(args.previous) if args.previous else None
    folds = make_folds(subjects, k=args.k, seed=args.seed, previous=previous)
    write_table(folds, args.out)
    print(f"{len(folds)} training subjects in {args.k} folds → {args.out}")
    return 0


# --- train -----------------------------------------------------------------------------------------------


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the UNet of one fold",
        description="Train on the subjects outside --fold, select weights on the subjects of --fold. "
        "Options default to the workflow's (config model and train), overridden by --config, then by the "
        "flags. The "
        f"normalised volumes are found under --data by name ({normalized_name('{s}', '{channel}')}, "
        f"{brain_mask_name('{s}')}). Rerunning after an interruption resumes from last.pt.",
    )
    p.add_argument("--folds", type=Path, required=True, help="folds TSV (subject, fold)")
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--data", type=Path, required=True, help="folder holding the normalised volumes")
    p.add_argument("--out", type=Path, required=True, help="output folder of this fold")
    p.add_argument("--cache", type=Path, help="cache folder shared by folds (default OUT/cache)")
    p.add_argument(
        "--config", type=Path, help="YAML mapping of training options (TrainConfig fields)"
    )
    p.add_argument("--channels", help="comma-separated input channels, e.g. ADC,FLAIR,T1w,lowT1c")
    for name, typ in (
        ("epochs", int),
        ("batch-size", int),
        ("learning-rate", float),
        ("width", int),
        ("depth", int),
        ("seed", int),
        ("checkpoint-every", int),
        ("threads", int),
    ):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--loss-region", choices=["volume", "brain"])
    p.add_argument(
        "--enhancement-weight",
        type=float,
        help="voxel weight of the loss: 1 + this x max(target - pre-contrast T1, 0); 0 = plain L2",
    )
    p.add_argument(
        "--rank-weight",
        type=float,
        help="weight of the enhancement ranking loss (enhancing voxels above the others); 0 = off",
    )
    p.add_argument(
        "--output", choices=list(UNET_OUTPUTS), help="network output (paper: direct; see docs)"
    )
    p.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
    p.add_argument(
        "--preprocess-options",
        type=Path,
        help="how the volumes were pre-processed, stored in model.pt so that `predict` can take a raw "
        "exam: a subject's provenance.json from the workflow, or a JSON/YAML of the options",
    )
    p.set_defaults(func=_run_train)


def train_values(args: argparse.Namespace) -> dict:
    """The training options of ``virtual-contrast train``: the config schema's (as the workflow's train rule
    passes them), then the --config file's, then the flags'."""
    import yaml

    from virtual_contrast.config import load_config, train_options

    config = load_config()
    values = {**train_options(config), "threads": config["train"]["threads"]}
    if args.config:
        if not args.config.exists():
            raise InputError("training configuration not found", path=args.config)
        values.update(yaml.safe_load(args.config.read_text()) or {})
    for key in (
        "epochs",
        "batch_size",
        "learning_rate",
        "width",
        "depth",
        "seed",
        "checkpoint_every",
        "threads",
        "device",
        "amp",
        "loss_region",
        "enhancement_weight",
        "rank_weight",
        "output",
        "compile",
    ):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.channels:
        values["channels"] = [c.strip() for c in args.channels.split(",") if c.strip()]
    return values


def _run_train(args: argparse.Namespace) -> int:
    from virtual_contrast.model.config import TrainConfig
    from virtual_contrast.model.data import find_subject_volumes
    from virtual_contrast.model.folds import fold_members, read_folds
    from virtual_contrast.model.train import train_fold

    cfg = TrainConfig.from_dict(train_values(args))
    preprocess = None
    if args.preprocess_options:
        preprocess = _read_preprocess_options(args.preprocess_options)
    train_ids, tune_ids = fold_members(read_folds(args.folds), args.fold)

    def volumes(s: str):
        return find_subject_volumes(args.data, s, cfg.channels, target=True)

    model = train_fold(
        [volumes(s) for s in train_ids],
        [volumes(s) for s in tune_ids],
        args.out,
        cfg,
        cache_dir=args.cache,
        preprocess=preprocess,
    )
    print(f"fold {args.fold}: {model}")
    return 0


def _read_preprocess_options(path: Path) -> dict:
    """Pre-processing options (as stored in model.pt) from a workflow provenance.json or an options file."""
    import yaml

    from virtual_contrast.preprocess.options import PreprocessOptions

    if not path.exists():
        raise InputError("pre-processing options file not found", path=path)
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"not JSON or YAML: {exc}", path=path) from exc
    if isinstance(values, dict) and "preprocess_options" in values:
        values = values["preprocess_options"]
    return PreprocessOptions.from_dict(values, source=f"pre-processing options in {path}").to_dict()


# --- predict ---------------------------------------------------------------------------------------------


def _add_predict(subparsers: argparse._SubParsersAction, defaults: dict) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict vir-T1c for one exam with trained fold models",
        description="Three ways to give the exam: (1) a raw exam (--raw and the models' input sequences, "
        "the T1 and the low-dose T1c: --t1 --flair --dwi --bval --low for the paper's inputs, where --dwi "
        "implies --raw; --raw --t1 --t2 --flair --low for models of T2w, FLAIR, T1w and lowT1c), "
        "pre-processed first exactly as the workflow that trained the models did (with the options stored "
        "in model.pt and this installation's tools, which must be those the models record), which also "
        "writes vir-T1c on the native low-dose T1c grid; (2) --channels-dir with "
        f"the normalised volumes ({normalized_name('{s}', '{channel}')}); (3) the normalised files one by one "
        "(--adc --flair --t1 --low, or the models' channels). All fold models' 8 mirror configurations are "
        "averaged. Every input is checked before any work; outputs appear in --out only when everything "
        "succeeded.",
    )
    p.add_argument(
        "--models",
        type=Path,
        nargs="+",
        required=True,
        help="model.pt files or folders searched for them",
    )
    p.add_argument("--channels-dir", type=Path, help="folder with normalised volumes")
    p.add_argument(
        "--raw",
        action="store_true",
        help="the files are a raw exam, pre-processed first (implied by --dwi or --bval)",
    )
    from virtual_contrast import sequences

    # One flag per sequence of the table (and per file that comes with one), then the computed channels.
    for key in sequences.COLUMNS:
        if key == sequences.key_of(sequences.TARGET):
            continue
        sequence = sequences.BY_KEY.get(key)
        if sequence is None:  # a companion file (the DWI's b-values)
            p.add_argument(f"--{key}", type=Path, help=f"{sequences.COLUMN_LABELS[key]} (raw exam)")
        elif sequence.computed:
            p.add_argument(
                f"--{key}", type=Path, help=f"raw {sequence.label}: selects the raw-exam mode"
            )
        else:
            p.add_argument(
                f"--{key}", type=Path, help=f"{sequence.label} (raw with --raw, else normalised)"
            )
    for channel in sequences.INPUT_CHANNELS:
        if sequences.BY_CHANNEL[channel].computed:
            p.add_argument(
                sequences.normalised_flag(channel), type=Path, help=f"normalised {channel}"
            )
    p.add_argument("--mask", type=Path, help="brain mask: prediction set to 0 outside")
    pre = defaults["preprocess"]
    raw = p.add_argument_group(
        "raw exam (--raw, or --dwi)",
        "The tools come from these flags (and this installation), never from the model files; they must "
        "be those the models record, which is checked before any work.",
    )
    raw.add_argument(
        "--atlas",
        type=Path,
        help=f"atlas folder at the models' voxel size (the workflow's {atlas_dir('<v>')}); "
        "default: prepared from the atlas files recorded in the models (nilearn's template)",
    )
    raw.add_argument(
        "--register-backend",
        choices=["auto", "fsl", "simpleitk"],
        default=pre["register_backend"],
        help="default: %(default)s",
    )
    raw.add_argument(
        "--skull-strip-backend",
        choices=BACKENDS,
        default=pre["skull_strip_backend"],
        help="default: %(default)s (deepbet unless --hdbet2-weights is given)",
    )
    raw.add_argument(
        "--hdbet-mode",
        choices=HDBET_MODES,
        help="HD-BET v1's mode (default: as recorded in the models)",
    )
    raw.add_argument("--hdbet2-weights", type=Path, help="HD-BET 2 weights folder")
    raw.add_argument(
        "--override-gate",
        action="store_true",
        help="predict even when the registration quality gate stored in the models rejects the exam (a "
        "slab that misses part of the brain, a failed registration); the output and provenance say so",
    )
    raw.add_argument(
        "--accept-preprocess-mismatch",
        action="store_true",
        help="pre-process with these tools even where they differ from those the models were trained "
        "with (the log and the exam's provenance say so); without it a difference stops the command",
    )
    p.add_argument(
        "--subject",
        help="subject id, letters and digits (file names; default: from --channels-dir)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=defaults["predict"]["device"],
        help="default: %(default)s",
    )
    p.add_argument(
        "--no-tta",
        action="store_false",
        dest="tta",
        default=defaults["predict"]["tta"],
        help="one pass per model, no mirroring (default: all 8 mirror configurations)",
    )
    p.add_argument(
        "--batch", type=int, help="mirrored copies per forward pass (default 8 on GPU, 1 on CPU)"
    )
    p.add_argument(
        "--calibration",
        type=Path,
        help="the uncertainty map's calibration (default: the workflow's "
        f"{UNCERTAINTY_CALIBRATION_NAME} beside the fold folders; without one the map is the standard "
        "deviation over the passes, which the output says)",
    )
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from virtual_contrast.model.predict_exam import (
        CHANNEL_FLAGS,
        RAW_FILES,
        ExamFiles,
        PreprocessTools,
        predict_exam,
    )

    flags = dict.fromkeys([*RAW_FILES, *(f[2:] for f in CHANNEL_FLAGS.values())])
    files = ExamFiles(
        images={k: getattr(args, k) for k in flags if getattr(args, k) is not None},
        raw_exam=args.raw,
        channels_dir=args.channels_dir,
        mask=args.mask,
    )
    tools = PreprocessTools(
        skull_strip_backend=args.skull_strip_backend,
        hdbet2_weights=str(args.hdbet2_weights or ""),
        register_backend=args.register_backend,
        hdbet_mode=args.hdbet_mode,
        atlas=args.atlas,
        accept_mismatch=args.accept_preprocess_mismatch,
        override_gate=args.override_gate,
    )
    done = predict_exam(
        args.models,
        files,
        args.out,
        tools=tools,
        subject=args.subject,
        device=args.device,
        tta=args.tta,
        batch=args.batch,
        calibration=args.calibration,
    )
    print(f"vir-T1c (atlas space): {done.atlas_space}")
    if done.native is not None:
        print(f"vir-T1c (native low-dose T1c grid): {done.native}")
    what = (
        f"expected |vir - ref|, calibration {done.calibration}"
        if done.calibration
        else "UNCALIBRATED: standard deviation over the passes (no calibration found)"
    )
    print(f"uncertainty ({what}): {done.uncertainty}")
    if done.uncertainty_native is not None:
        print(f"uncertainty (native low-dose T1c grid): {done.uncertainty_native}")
        print(f"pre-processing (every intermediate, provenance): {done.work_dir}")
    if done.gate_overridden:
        print(
            "WARNING: the registration quality gate REJECTED this exam ("
            + "; ".join(done.gate_failures)
            + f"); predicted anyway because of --override-gate. Look at {done.rejected_figure}."
        )
    return 0
