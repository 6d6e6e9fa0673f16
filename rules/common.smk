# Validation, the subject table, wildcard constraints, input functions and the one path helper.
import sys
from pathlib import Path

from snakemake.utils import validate

# The library lives beside the workflow; make it importable when Snakemake runs without `pip install`.
sys.path.insert(0, workflow.basedir)

from virtual_contrast.atlas import ATLAS_FILES  # noqa: E402
from virtual_contrast.checks import check_config, check_study  # noqa: E402
from virtual_contrast.cli import report_error  # noqa: E402
from virtual_contrast.io import InputError  # noqa: E402
from virtual_contrast.preprocess.options import PreprocessOptions  # noqa: E402
from virtual_contrast.subjects import SUBJECT_ID_PATTERN, flowchart_counts  # noqa: E402
from virtual_contrast.workflow import BIDS_FILES, cohort_lesion_table, plan_study  # noqa: E402
from virtual_contrast.dicom import sidecar  # noqa: E402
from virtual_contrast.workflow import DICOM_DIR, bids_exam_files, dicom_exam_record  # noqa: E402


validate(config, "../virtual_contrast/schemas/config.schema.yaml")

# What the schema cannot say (related values, files, the study itself) is checked before any job, even in a
# dry run: a mistake stops the run with one line naming the key, table row or file, and exit status 2.
try:
    check_config(config)
    STUDY = plan_study(config)
    check_study(
        config,
        n_train=len(STUDY.train_subjects),
        n_test=len(STUDY.test_subjects),
        source=STUDY.source,
    )
except InputError as exc:
    sys.exit(report_error("virtual-contrast workflow", exc))
# One typed options object for every pre-processing rule (each takes its part) and stored in model.pt.
PREPROCESS_OPTIONS = PreprocessOptions.from_config(config).to_dict()
SUBJECTS = STUDY.subjects
CHANNELS = ["T1w", "FLAIR", "ADC", "lowT1c", "refT1c"]
# Network inputs (config model.channels, in order) and the training folds.
INPUT_CHANNELS = list(config["model"]["channels"])
FOLDS = list(range(config["split"]["folds"]))


def atlas_files(voxel_mm):
    """The atlas volumes on an isotropic grid of voxel_mm, as written by rule `atlas`."""
    return {key: f"results/atlas/res-{voxel_mm}mm/{name}" for key, name in ATLAS_FILES.items()}


# The working grid of pre-processing and model; the cohort is simulated from the atlas at its own voxel size.
ATLAS = atlas_files(config["grid"]["voxel_mm"])
COHORT_ATLAS = atlas_files(config["cohort"]["native_voxel_mm"])


wildcard_constraints:
    subject=SUBJECT_ID_PATTERN,
    channel="|".join(CHANNELS),
    fold=r"\d+",
    session=r"\d+",
    res=r"[0-9]+(\.[0-9]+)?",


def sub(subject, step, name):
    """Path of a per-subject file: results/sub-{subject}/{step}/sub-{subject}_{name}."""
    return f"results/sub-{subject}/{step}/sub-{subject}_{name}"


def get_raw(wildcards):
    """The raw sequences of one subject (dict for unpack())."""
    return STUDY.raw_inputs(wildcards.subject)


def get_final_outputs():
    outputs = [
        "results/tables/exclusions.tsv",
        "results/figures/flowchart.png",
    ]
    outputs += expand("results/sub-{subject}/sub-{subject}_qc.png", subject=SUBJECTS)
    outputs += expand("results/sub-{subject}/provenance.json", subject=SUBJECTS)
    outputs.append("results/tables/registration_quality.tsv")
    if STUDY.embedded:
        outputs.append("results/cohort/lesions.tsv")
    outputs += expand("results/models/fold-{fold}/loss_curve.png", fold=FOLDS)
    outputs += [
        "results/tables/voxel_metrics.tsv",
        "results/reader_study/detection.tsv",
        "results/reader_study/reading_key.tsv",
        "results/tables/demographics.tsv",
    ]
    if STUDY.embedded:
        outputs.append("results/tables/detector_validation.tsv")
        outputs.append("results/tables/detector_froc.tsv")
        outputs.append("results/reader_study/reference-truth/detection.tsv")
    outputs += expand(
        "results/figures/detections/sub-{subject}_detections.png", subject=STUDY.test_subjects
    )
    outputs += expand(
        "results/sub-{subject}/predict/sub-{subject}_space-{space}_desc-virtual_T1c.nii.gz",
        subject=STUDY.test_subjects,
        space=["ICBM09a", "native"],
    )
    if STUDY.dicom_manifests:
        outputs += expand(rules.export_dicom.output.series, subject=STUDY.test_subjects)
    return outputs


def dicom_import_outputs():
    """Outputs of import_dicom, with {subject} and {session} wildcards; each sequence, its sidecar, the report."""
    files = bids_exam_files(DICOM_DIR, "{subject}", "{session}")
    outputs = {key: str(path) for key, path in files.items()}
    outputs.update({f"{key}_json": str(sidecar(files[key])) for key in ("t1", "flair", "low", "ref", "dwi")})
    outputs["report"] = str(dicom_exam_record("{subject}", "{session}", "dicom.tsv"))
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


def normalized(subject):
    """The normalised channels and brain mask of one subject (paths of rule normalize)."""
    out = rules.normalize.output
    return {key: out[key].format(subject=subject) for key in [*CHANNELS, "mask"]}


def get_training_volumes(wildcards):
    """Normalised volumes of every training subject: test subjects never enter a training job."""
    return [path for s in STUDY.train_subjects for path in normalized(s).values()]


def train_config():
    """Options of virtual_contrast.model.train.TrainConfig from the config."""
    m, t = config["model"], config["train"]
    return {
        "channels": INPUT_CHANNELS,
        "width": m["width"],
        "depth": m["depth"],
        "output": m["output"],
        "epochs": t["epochs"],
        "batch_size": t["batch_size"],
        "learning_rate": t["learning_rate"],
        "lr_schedule": t["lr_schedule"],
        "grad_clip": t["grad_clip"],
        "divergence_guard": t["divergence_guard"],
        "seed": t["seed"],
        "device": t["device"],
        "checkpoint_every": t["checkpoint_every"],
    }


def registration_transform(subject, channel):
    """The atlas -> native transform of one channel of one subject (written by rule register)."""
    return rules.register.output.transforms[CHANNELS.index(channel)].format(subject=subject)


def get_detection_images(wildcards):
    """Post-contrast images to search for lesions: ref and low for every subject, vir for test subjects."""
    images = {"ref": normalized(wildcards.subject)["refT1c"], "low": normalized(wildcards.subject)["lowT1c"]}
    if wildcards.subject in STUDY.test_subjects:
        images["vir"] = rules.predict.output.atlas.format(subject=wildcards.subject)
    return images


def get_operating_point(wildcards):
    """The decision threshold tuned on the training subjects (embedded cohort); none with real data, where
    detect_lesions uses config evaluate.detector.threshold."""
    return {"operating_point": "results/tables/detector_operating_point.json"} if STUDY.embedded else {}


def get_subject_truth(wildcards):
    """The true lesions and the full-dose T1c's registration of one subject (embedded cohort only)."""
    if not STUDY.embedded:
        return {}
    return {
        "truth": "results/cohort/lesions.tsv",
        "transform": registration_transform(wildcards.subject, "refT1c"),
    }


def get_reader_inputs(wildcards):
    """Real annotations when configured, else the automated reader's detections on the test subjects."""
    rs = config["reader_study"]
    if rs["lesions"]:
        return {"lesions": rs["lesions"], **({"reads": rs["reads"]} if rs["reads"] else {})}
    return {
        "detections": expand(rules.detect_lesions.output.detections, subject=STUDY.test_subjects)
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


def get_register_inputs(wildcards):
    """Native sequences, and the image each is aligned with (the DWI's mean b0 stands in for the ADC)."""
    raw = STUDY.raw_inputs(wildcards.subject)
    adc = rules.adc.output
    return {
        "T1w": raw["t1"],
        "FLAIR": raw["flair"],
        "lowT1c": raw["low"],
        "refT1c": raw["ref"],
        "ADC": adc.adc.format(subject=wildcards.subject),
        "b0": adc.b0.format(subject=wildcards.subject),
    }


def list_rejected_registrations(subjects):
    """After a failed run (onerror): the registrations the quality gate rejected, on stderr and in a table."""
    from virtual_contrast.io import write_table
    from virtual_contrast.preprocess.quality import rejected_registrations

    table = Path("results/tables/registration_rejected.tsv")
    evidence = {s: sub(s, "register", "desc-rejected_registration.json") for s in subjects}
    rows = rejected_registrations(evidence)
    if not rows:
        table.unlink(missing_ok=True)
        return
    import pandas as pd

    write_table(pd.DataFrame(rows), table)
    print(f"The registration quality gate rejected {len(rows)} subject(s) ({table}):", file=sys.stderr)
    for row in rows:
        print(f"  sub-{row['subject']}: {row['failures']}; look at {row['figure']}", file=sys.stderr)
