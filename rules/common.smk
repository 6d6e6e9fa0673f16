# Validation, the subject table, wildcard constraints and input functions. Every path comes from
# virtual_contrast.layout (`layout.` below), where each file name of the study is spelled once.
import sys
from pathlib import Path

# The library lives beside the workflow; make it importable when Snakemake runs without `pip install`.
sys.path.insert(0, workflow.basedir)

from virtual_contrast import layout  # noqa: E402
from virtual_contrast.backends import resolve_backends, with_backends  # noqa: E402
from virtual_contrast.checks import check_config, check_study, requested_checks  # noqa: E402
from virtual_contrast.cli import report_error  # noqa: E402
from virtual_contrast.config import train_options, validate_config  # noqa: E402
from virtual_contrast.io import InputError  # noqa: E402
from virtual_contrast.preprocess.options import PreprocessOptions  # noqa: E402
from virtual_contrast.runlock import clear_stale_lock, forget_run, record_run  # noqa: E402
from virtual_contrast.sequences import (  # noqa: E402
    ALWAYS_NEEDED,
    ANCHOR,
    BY_CHANNEL,
    LOW_DOSE,
    TARGET,
    exam_files,
)
from virtual_contrast.subjects import SUBJECT_ID_PATTERN, flowchart_counts  # noqa: E402
from virtual_contrast.workflow import plan_study  # noqa: E402
from virtual_contrast.dicom import sidecar  # noqa: E402


# A run killed with kill -9 leaves Snakemake's lock: removed when nothing of that run is alive on this machine
# (virtual_contrast.runlock), so that the same command finishes it. Each run records itself once it holds the
# lock and forgets itself when it ends (onerror: rules/qc.smk).
if workflow.is_main_process:
    _cleared = clear_stale_lock(".snakemake")
    if _cleared:
        logger.warning(_cleared)


onstart:
    record_run(".snakemake")


onsuccess:
    forget_run(".snakemake")


# The schema (virtual_contrast/schemas/config.schema.yaml) fills in every default, then what it cannot say
# (related values, files, the study itself) is checked before any job, even in a dry run: a mistake stops the
# run with one line naming the key, table row or file, and exit status 2.
try:
    validate_config(config)
    check_config(config)
    STUDY = plan_study(config)
    # The study's own checks (enough training and test subjects) depend on the targets: check_requested_targets.
    # `auto` backends resolved once, here, for every job of the run: nodes with and without FSL cannot
    # register one study with two tools. Each job gets the resolved name; provenance.json records the choice.
    BACKENDS = resolve_backends(config)
except InputError as exc:
    sys.exit(report_error("virtual-contrast workflow", exc))
# One typed options object for every pre-processing rule (each takes its part) and stored in model.pt.
PREPROCESS_OPTIONS = PreprocessOptions.from_config(with_backends(config, BACKENDS)).to_dict()
SUBJECTS = STUDY.subjects
# The channels pre-processed for every subject: the model's inputs, the pre-contrast T1, the low dose and the
# target (virtual_contrast.sequences). Network inputs (config model.channels, in order) and the training folds.
CHANNELS = list(STUDY.channels)
INPUT_CHANNELS = list(config["model"]["channels"])
FOLDS = list(range(config["split"]["folds"]))
# How tables and figures name the post-contrast images: a simulated low dose says so wherever it is shown.
IMAGE_LABELS = {
    "low": "simulated low-T1c" if STUDY.simulated_low_dose else "low-T1c",
    "vir": "vir-T1c",
    "ref": "ref-T1c",
}
# The working grid of pre-processing and model; the cohort is simulated from the atlas at its own voxel size.
ATLAS = layout.atlas_files(config["grid"]["voxel_mm"])
COHORT_ATLAS = layout.atlas_files(config["cohort"]["native_voxel_mm"])


wildcard_constraints:
    subject=SUBJECT_ID_PATTERN,
    fold=r"\d+",
    session=r"\d+",
    res=r"[0-9]+(\.[0-9]+)?",


def check_requested_targets():
    """Stop before the first job, in one line, when the study cannot complete the requested targets (the checks
    of virtual_contrast.checks.RULE_NEEDS); called by the Snakefile once all rules are defined.
    Then log the plan: the backends, and why every exam is excluded when none is included."""
    excluded = [
        (f"sub-{row.subject}" + (f" ses-{row.session}" if getattr(row, "session", "") else ""), row.reason)
        for row in STUDY.selection.excluded.itertuples()
    ]
    if workflow.is_main_process:  # (a job re-parsing the workflow: the main process checked)
        settings = requested_dag_settings()
        if settings is None:  # not a run (--lint, --list-rules): every check, as for the default target
            checks = requested_checks([workflow.default_target])
        else:
            checks = requested_checks(
                rules_of(settings.targets) or [workflow.default_target], rules_of(settings.until)
            )
        try:
            check_study(
                config,
                n_train=len(STUDY.train_subjects),
                n_test=len(STUDY.test_subjects),
                source=STUDY.source,
                checks=checks,
                embedded=STUDY.embedded,
                excluded=excluded,
            )
        except InputError as exc:
            sys.exit(report_error("virtual-contrast workflow", exc))
    logger.info(
        "backends of this run: "
        + "; ".join(f"{step} {b['backend']} ({b['reason']})" for step, b in BACKENDS.items())
    )
    if excluded and not SUBJECTS:
        logger.info(
            f"every exam is excluded ({layout.table('exclusions')}): "
            + "; ".join(f"{exam}: {reason}" for exam, reason in excluded)
        )


def rules_of(targets):
    """Rule names of Snakemake targets (rule names, or files mapped to the rules that make them)."""
    names = {rule.name for rule in workflow.rules}
    found = []
    for target in targets:
        if target in names:
            found.append(target)
        else:
            found += [rule.name for rule in workflow.rules if rule.is_producer(target)]
    return found


def requested_dag_settings():
    """The targets, --until and --omit-from of this run (Snakemake's DAGSettings), or None outside a run.

    Snakemake 9 parses the Snakefile inside DAGApi.__post_init__ (snakemake/api.py: it reads
    `self.workflow_api._workflow`, which includes the Snakefile) and only then hands the workflow its
    DAGSettings, so `workflow.dag_settings` is still None here; the settings are read from that frame."""
    if workflow.dag_settings is not None:
        return workflow.dag_settings
    from snakemake.api import DAGApi

    frame = sys._getframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, DAGApi):
            return candidate.dag_settings
        frame = frame.f_back
    return None


def get_raw(wildcards):
    """The raw sequences of one subject (dict for unpack())."""
    return STUDY.raw_inputs(wildcards.subject)


def get_final_outputs():
    outputs = [rules.exclusions.output.table, rules.exclusions.output.flowchart]
    outputs += expand(rules.qc.output.figure, subject=SUBJECTS)
    outputs += expand(rules.qc.output.provenance, subject=SUBJECTS)
    outputs.append(rules.registration_quality.output.table)
    if STUDY.embedded:
        outputs.append(rules.cohort_truth.output.lesions)
    outputs += expand(rules.train.output.curve, fold=FOLDS)
    outputs += [
        rules.voxel_metrics.output.table,
        rules.reader_stats.output.detection,
        rules.reading_lists.output.key,
        rules.demographics.output.table,
    ]
    outputs.append(rules.uncertainty_calibration.output.figure)
    if STUDY.embedded:
        outputs.append(rules.detector_validation.output.table)
        outputs.append(rules.detector_froc.output.froc)
        outputs.append(rules.reader_stats_truth.output.detection)
        outputs.append(rules.uncertainty_lesions.output.summary)
    outputs += expand(rules.detection_overlay.output.figure, subject=STUDY.test_subjects)
    outputs += expand(rules.predict.output.atlas, subject=STUDY.test_subjects)
    outputs += expand(rules.predict.output.native, subject=STUDY.test_subjects)
    outputs += expand(rules.predict.output.uncertainty_native, subject=STUDY.test_subjects)
    if STUDY.dicom_manifests:
        outputs += expand(rules.export_dicom.output.series, subject=STUDY.test_subjects)
    return outputs


def dicom_import_outputs():
    """Outputs of import_dicom, with {subject} and {session} wildcards; each sequence the study needs, its
    sidecar, the report."""
    files = layout.bids_exam_files(layout.DICOM_DIR, "{subject}", "{session}")
    outputs = {key: str(files[key]) for key in exam_files(STUDY.raw_keys)}
    outputs.update({f"{key}_json": str(sidecar(files[key])) for key in STUDY.raw_keys})
    outputs["report"] = str(layout.dicom_exam_record("{subject}", "{session}", "dicom.tsv"))
    return outputs


def get_dicom_manifest(wildcards):
    """The manifest of a subject's DICOM exam (the low-dose series that vir-T1c is exported over)."""
    return STUDY.dicom_manifests[wildcards.subject]


def reading_image_format():
    """nifti, dicom or both (config reader_study.image_format; auto: both for DICOM inputs)."""
    image_format = config["reader_study"]["image_format"]
    if image_format == "auto":
        return "both" if STUDY.dicom_manifests else "nifti"
    return image_format


def get_reading_sources(wildcards):
    """Each test subject's DICOM manifest, whose low-dose series lends its acquisition attributes to the
    de-identified reading series (none for NIfTI inputs)."""
    if reading_image_format() == "nifti" or not STUDY.dicom_manifests:
        return {}
    return {"manifests": [STUDY.dicom_manifests[s] for s in STUDY.test_subjects]}


def get_reading_companions(wildcards):
    """The images shown beside each case: the pre-contrast T1, and the FLAIR when the study has one."""
    companions = {"t1": [normalized(s)[ANCHOR] for s in STUDY.test_subjects]}
    if "FLAIR" in CHANNELS:
        companions["flair"] = [normalized(s)["FLAIR"] for s in STUDY.test_subjects]
    return companions


def normalized(subject):
    """The normalised channels and brain mask of one subject (paths of rule normalize)."""
    out = rules.normalize.output
    return {key: out[key].format(subject=subject) for key in [*CHANNELS, "mask"]}


def get_training_volumes(wildcards):
    """Normalised volumes of every training subject, subject by subject in the order of
    training_volume_subjects(), each as training_volume_keys(): test subjects never enter a training job."""
    return [normalized(s)[key] for s in STUDY.train_subjects for key in training_volume_keys()]


def training_volume_keys():
    """The files of one subject that training reads: the input channels, the target, the brain mask."""
    return [*INPUT_CHANNELS, TARGET, "mask"]


def train_config():
    """Options of virtual_contrast.model.train.TrainConfig: model.channels, width, depth, output and every
    key of the config's train section but the job's size (threads, mem_mb, runtime_min)."""
    return train_options(config)


def registration_transform(subject, channel):
    """The atlas -> native transform of one channel of one subject (written by rule register)."""
    return rules.register.output.transforms[CHANNELS.index(channel)].format(subject=subject)


def get_detection_images(wildcards):
    """Post-contrast images to search for lesions: ref and low for every subject; vir for test subjects, and
    for training subjects their out-of-fold vir (the per-lesion comparison of the uncertainty map)."""
    images = {
        "ref": normalized(wildcards.subject)[TARGET],
        "low": normalized(wildcards.subject)[LOW_DOSE],
    }
    if wildcards.subject in STUDY.test_subjects:
        images["vir"] = rules.predict.output.atlas.format(subject=wildcards.subject)
    elif wildcards.subject in STUDY.train_subjects:
        images["vir"] = rules.predict_out_of_fold.output.atlas.format(subject=wildcards.subject)
    return images


def uncertainty_map_of(subject):
    """vir-T1c's uncertainty map (atlas space) of a subject: out of fold for a training subject."""
    if subject in STUDY.test_subjects:
        return rules.predict.output.uncertainty.format(subject=subject)
    return rules.out_of_fold_uncertainty.output.uncertainty.format(subject=subject)


def spread_of(subject):
    """The raw spreads of the passes behind a subject's vir-T1c (out of fold for a training subject)."""
    if subject in STUDY.test_subjects:
        return rules.predict.output.spread.format(subject=subject)
    return rules.predict_out_of_fold.output.spread.format(subject=subject)


def get_uncertainty(wildcards):
    """The uncertainty map of the subject's vir-T1c, for its detections (dict for unpack())."""
    return {"uncertainty": uncertainty_map_of(wildcards.subject)}


def get_operating_point(wildcards):
    """The decision threshold tuned on the training subjects (embedded cohort); none with real data, where
    detect_lesions uses config evaluate.detector.threshold."""
    return {"operating_point": rules.detector_froc.output.operating_point} if STUDY.embedded else {}


def get_subject_truth(wildcards):
    """The true lesions and the full-dose T1c's registration of one subject (embedded cohort only)."""
    if not STUDY.embedded:
        return {}
    return {
        "truth": rules.cohort_truth.output.lesions,
        "transform": registration_transform(wildcards.subject, TARGET),
    }


def get_reader_inputs(wildcards):
    """Real annotations when configured, else the automated reader's detections on the test subjects."""
    rs = config["reader_study"]
    if rs["lesions"]:
        return {"lesions": rs["lesions"], **({"reads": rs["reads"]} if rs["reads"] else {})}
    return {
        "detections": expand(rules.detect_lesions.output.detections, subject=STUDY.test_subjects)
    }


def reader_stats_outputs(folder, detection_caption, table5_caption):
    """The outputs of the reader statistics written into folder, the detection table and Table 5 in the
    report with the captions report/<name>.rst."""
    files = layout.reader_stats_files(folder)
    in_report = {"detection": detection_caption, "table5": table5_caption}
    return {
        key: report(path, caption=f"report/{in_report[key]}.rst", category="5. Lesion detection")
        if key in in_report
        else path
        for key, path in files.items()
    }


def reading_lists_reference_reader():
    """The reader who also reads every ref-T1c in the reading lists: the configured one, else the first."""
    rs = config["reader_study"]
    return rs["reference_reader"] or rs["readers"][0]


def get_native_t1(wildcards):
    return STUDY.raw_inputs(wildcards.subject)["t1"]


def get_dwi(wildcards):
    raw = STUDY.raw_inputs(wildcards.subject)
    return {"dwi": raw["dwi"], "bval": raw["bval"]}


def get_simulate_low_dose_inputs(wildcards):
    """The acquired pre-contrast T1 and full-dose T1c that a simulated low dose is made from."""
    raw = STUDY.raw_inputs(wildcards.subject)
    return {"t1": raw[BY_CHANNEL[ANCHOR].key], "ref": raw[BY_CHANNEL[TARGET].key]}


def get_low_dose_provenance(wildcards):
    """How the low dose of a study that simulates it was made (rule simulate_low_dose), for provenance.json."""
    if not STUDY.simulated_low_dose:
        return {}
    return {"low_dose": rules.simulate_low_dose.output.provenance}


def register_alignment():
    """Each channel registered to the pre-contrast T1: (the input of rule register to resample, the input
    its rigid alignment is estimated on). The ADC is aligned through its DWI's mean b0, which has the
    anatomy (virtual_contrast.sequences: ``align_on``)."""
    return {
        c: (c, BY_CHANNEL[c].align_on or c) for c in CHANNELS if BY_CHANNEL[c].registered_to == ANCHOR
    }


def register_features():
    """What each channel's rigid alignment with the T1 compares: intensities, or the gradient magnitudes for
    a contrast whose intensities mislead mutual information (the T2; virtual_contrast.sequences:
    ``align_feature``)."""
    return {c: BY_CHANNEL[c].align_feature for c in register_alignment()}


def get_register_inputs(wildcards):
    """Native sequences, and the image each is aligned with (the DWI's mean b0 stands in for the ADC)."""
    raw = STUDY.raw_inputs(wildcards.subject)
    inputs = {}
    for channel in CHANNELS:
        if channel == "ADC":  # computed from the DWI by rule adc, on the DWI's grid
            adc = rules.adc.output
            inputs["ADC"] = adc.adc.format(subject=wildcards.subject)
            inputs["b0"] = adc.b0.format(subject=wildcards.subject)
        else:
            inputs[channel] = raw[BY_CHANNEL[channel].key]
    return inputs


def list_rejected_registrations(subjects):
    """After a failed run (onerror): the registrations the quality gate rejected, on stderr and in a table."""
    from virtual_contrast.io import write_table
    from virtual_contrast.preprocess.quality import rejected_registrations

    table = Path(layout.table("registration_rejected"))
    evidence = {s: layout.rejected_registration(s, ".json") for s in subjects}
    rows = rejected_registrations(evidence)
    if not rows:
        table.unlink(missing_ok=True)
        return
    import pandas as pd

    write_table(pd.DataFrame(rows), table)
    print(f"The registration quality gate rejected {len(rows)} subject(s) ({table}):", file=sys.stderr)
    for row in rows:
        print(f"  sub-{row['subject']}: {row['failures']}; look at {row['figure']}", file=sys.stderr)
