"""Command-line subcommands of this area (registered by virtual_contrast.cli): split, train, predict."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_contrast.io import InputError, staged_folder, write_table
from virtual_contrast.layout import (
    ATLAS_SPACE,
    MODEL_FILES,
    NATIVE_SPACE,
    atlas_dir,
    bids_name,
    brain_mask_name,
    exam_work_name,
    normalized_name,
    parse_name,
    predicted_name,
)
from virtual_contrast.model.config import UNET_OUTPUTS

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
        description="Three ways to give the exam: (1) a raw exam (--t1 --flair --dwi --bval --low), "
        "pre-processed first exactly as the workflow that trained the models did (the options are stored "
        "in model.pt), which also writes vir-T1c on the native low-dose T1c grid; (2) --channels-dir with "
        f"the normalised volumes ({normalized_name('{s}', '{channel}')}); (3) the normalised files one by one "
        "(--adc --flair --t1 --low). All fold models' 8 mirror configurations are averaged. Every input "
        "is checked before any work; outputs appear in --out only when everything succeeded.",
    )
    p.add_argument(
        "--models",
        type=Path,
        nargs="+",
        required=True,
        help="model.pt files or folders searched for them",
    )
    p.add_argument("--channels-dir", type=Path, help="folder with normalised volumes")
    p.add_argument("--adc", type=Path, help="normalised ADC")
    p.add_argument("--flair", type=Path, help="FLAIR (raw with --dwi, else normalised)")
    p.add_argument("--t1", type=Path, help="pre-contrast T1 (raw with --dwi, else normalised)")
    p.add_argument("--low", type=Path, help="low-dose T1c (raw with --dwi, else normalised)")
    p.add_argument(
        "--dwi", type=Path, help="raw DWI (b=0 and b=1000 volumes): selects the raw-exam mode"
    )
    p.add_argument("--bval", type=Path, help="b-values of --dwi")
    p.add_argument("--mask", type=Path, help="brain mask: prediction set to 0 outside")
    raw = p.add_argument_group("raw exam (with --dwi); each default: as recorded in the models")
    raw.add_argument(
        "--atlas",
        type=Path,
        help=f"atlas folder at the models' voxel size (the workflow's {atlas_dir('<v>')}); "
        "default: prepared from the atlas files recorded in the models (nilearn's template)",
    )
    raw.add_argument("--register-backend", choices=["auto", "fsl", "simpleitk"])
    raw.add_argument("--skull-strip-backend", choices=["auto", "deepbet", "hdbet"])
    raw.add_argument("--hdbet-weights", type=Path, help="HD-BET weights folder")
    raw.add_argument(
        "--override-gate",
        action="store_true",
        help="predict even when the registration quality gate stored in the models rejects the exam (a "
        "slab that misses part of the brain, a failed registration); the output and provenance say so",
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
    p.set_defaults(func=_run_predict)


def find_models(paths: list[Path]) -> list[Path]:
    """``model.pt`` files given directly or found (recursively) in the given folders, sorted."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            hits = sorted(p.rglob(MODEL_FILES["model"]))
            if not hits:
                raise InputError(f"no {MODEL_FILES['model']} found in this folder", path=p)
            found.extend(hits)
        elif p.exists():
            found.append(p)
        else:
            raise InputError("model not found", path=p)
    return found


def _subject_in_dir(folder: Path) -> str:
    pattern = normalized_name("*", "*").removesuffix(".gz") + "*"  # .nii or .nii.gz
    ids = sorted({parse_name(f.name)["sub"] for f in folder.rglob(pattern)})
    if len(ids) != 1:
        raise InputError(
            f"cannot tell the subject: found {ids or 'no normalised volumes'}; pass --subject",
            path=folder,
        )
    return ids[0]


def preprocess_options_of(models: list[Path], args: argparse.Namespace):
    """The pre-processing options stored in the models (all must agree), with the command line's
    overrides of machine-specific choices (backends, HD-BET weights); returns (options, overrides)."""
    from dataclasses import replace

    from virtual_contrast.model.checkpoint import load_checkpoint
    from virtual_contrast.preprocess.options import PreprocessOptions

    stored = []
    for path in models:
        ckpt = load_checkpoint(path)
        if "preprocess" not in ckpt:
            raise InputError(
                "this model.pt does not record the pre-processing options it was trained with (written "
                "by an older version, or trained outside the workflow): pre-process the exam with the "
                "workflow and pass the normalised volumes (--channels-dir)",
                path=path,
            )
        stored.append(ckpt["preprocess"])
    if any(s != stored[0] for s in stored[1:]):
        raise InputError(
            "the models were trained on differently pre-processed volumes: give models of one run",
            path=models[0],
        )
    options = PreprocessOptions.from_dict(
        stored[0], source=f"pre-processing options in {models[0]}"
    )
    overrides = {}
    if args.register_backend:
        overrides["register.backend"] = args.register_backend
        options = replace(
            options, register=replace(options.register, backend=args.register_backend)
        )
    if args.skull_strip_backend or args.hdbet_weights:
        strip = options.skull_strip
        if args.skull_strip_backend:
            overrides["skull_strip.backend"] = args.skull_strip_backend
            strip = replace(strip, backend=args.skull_strip_backend)
        if args.hdbet_weights:
            overrides["skull_strip.hdbet_weights"] = str(args.hdbet_weights)
            strip = replace(strip, hdbet_weights=str(args.hdbet_weights))
        options = replace(options, skull_strip=strip)
    for key, value in overrides.items():
        log.warning(
            "pre-processing option %s set to %r on the command line (not as trained)", key, value
        )
    return options, overrides


def _check_normalised(paths: dict[str, Path], subject: str) -> None:
    """Normalised volumes lie within the normalised scale; a raw image given instead is an error."""
    from virtual_contrast.intensity import range_problem
    from virtual_contrast.io import load_image

    for channel, path in paths.items():
        problem = range_problem(np.asanyarray(load_image(path, subject=subject).dataobj))
        if problem is not None:
            raise InputError(
                f"{channel} is not a normalised volume: {problem}; for a raw exam give --dwi and --bval "
                "too (it is then pre-processed first)",
                subject=subject,
                path=path,
            )


def _run_predict(args: argparse.Namespace) -> int:
    from virtual_contrast.model.checkpoint import load_checkpoint
    from virtual_contrast.model.predict import predict_subject
    from virtual_contrast.subjects import check_subject_id

    if args.subject is not None:
        check_subject_id(args.subject)
    models = find_models(args.models)
    channels = list(load_checkpoint(models[0])["channels"])
    flips = "all8" if args.tta else "none"
    raw_mode = args.dwi is not None or args.bval is not None
    if args.override_gate and not raw_mode:
        raise InputError(
            "--override-gate applies to a raw exam (--dwi and --bval): the registration quality gate "
            "runs when predict pre-processes the exam"
        )
    if raw_mode:
        if args.adc or args.channels_dir:
            raise InputError(
                "--dwi/--bval (raw exam) cannot be combined with --adc or --channels-dir"
            )
        missing = [n for n in ("t1", "flair", "dwi", "bval", "low") if getattr(args, n) is None]
        if missing:
            raise InputError(f"a raw exam needs --{' --'.join(missing)} as well")
        subject = args.subject or "exam"
        options, overrides = preprocess_options_of(models, args)
    elif args.channels_dir:
        if any(getattr(args, n) for n in ("adc", "flair", "t1", "low")):
            raise InputError(
                "give either --channels-dir or the files --adc --flair --t1 --low, not both"
            )
        subject = check_subject_id(args.subject or _subject_in_dir(args.channels_dir))
    else:
        given = {"ADC": args.adc, "FLAIR": args.flair, "T1w": args.t1, "lowT1c": args.low}
        if "ADC" in channels and args.adc is None and any(given.values()):
            raise InputError(
                "no ADC: a raw exam needs --dwi and --bval (the ADC is computed from the DWI); to "
                "predict from normalised volumes, give the normalised ADC with --adc"
            )
        flag = {"ADC": "--adc", "FLAIR": "--flair", "T1w": "--t1", "lowT1c": "--low"}
        missing = [flag[c] for c in channels if given.get(c) is None]
        if missing:
            raise InputError(
                f"the models take {channels}: pass {' '.join(missing)} (or --channels-dir, or a raw "
                "exam with --dwi and --bval)"
            )
        subject = args.subject or "exam"
        _check_normalised({c: given[c] for c in channels}, subject)

    out = args.out
    atlas_name = predicted_name(subject, ATLAS_SPACE)
    native_name = predicted_name(subject, NATIVE_SPACE)
    work_dir = exam_work_name(subject)
    with staged_folder(out) as stage:
        mask = args.mask
        to_native = None
        if raw_mode:
            from virtual_contrast.io import write_json
            from virtual_contrast.preprocess.exam import preprocess_exam

            prepared = preprocess_exam(
                t1=args.t1,
                flair=args.flair,
                dwi=args.dwi,
                bval=args.bval,
                low=args.low,
                out_dir=stage / work_dir,
                subject=subject,
                options=options,
                atlas_dir=args.atlas,
                rejected_figure=out
                / bids_name(subject, desc="rejected", suffix="registration", extension=".png"),
                override_gate=args.override_gate,
            )
            if args.override_gate and prepared["gate"].get("overridden"):
                overrides["registration_gate"] = "rejected, overridden by --override-gate"
            if overrides:
                write_json(
                    {"command_line_overrides": overrides},
                    stage / work_dir / "overrides.json",
                )
            channel_paths = dict(prepared["channels"])
            mask = mask or prepared["mask"]
            to_native = prepared["to_native"]
        elif args.channels_dir:
            from virtual_contrast.model.data import find_subject_volumes

            sv = find_subject_volumes(args.channels_dir, subject, channels, target=False)
            channel_paths, mask = dict(sv.channels), mask or sv.mask
        else:
            channel_paths = {c: given[c] for c in channels}
        predict_subject(
            models,
            channel_paths,
            stage / atlas_name,
            device=args.device,
            flips=flips,
            mask_path=mask,
            subject=subject,
            batch=args.batch,
        )
        if to_native is not None:
            to_native(stage / atlas_name, stage / native_name)
    print(f"vir-T1c (atlas space): {out / atlas_name}")
    if to_native is not None:
        print(f"vir-T1c (native low-dose T1c grid): {out / native_name}")
        print(f"pre-processing (every intermediate, provenance): {out / work_dir}")
    if raw_mode and prepared["gate"].get("overridden"):
        figure = out / bids_name(subject, desc="rejected", suffix="registration", extension=".png")
        print(
            "WARNING: the registration quality gate REJECTED this exam ("
            + "; ".join(prepared["gate"]["failures"])
            + f"); predicted anyway because of --override-gate. Look at {figure}."
        )
    return 0
