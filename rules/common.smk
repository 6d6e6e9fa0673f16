# Validation, the subject table, wildcard constraints, input functions and the one path helper.
import sys
from pathlib import Path

from snakemake.utils import validate

# The library lives beside the workflow; make it importable when Snakemake runs without `pip install`.
sys.path.insert(0, workflow.basedir)

from virtual_contrast.atlas import ATLAS_FILES  # noqa: E402
from virtual_contrast.subjects import SUBJECT_ID_PATTERN, flowchart_counts  # noqa: E402
from virtual_contrast.workflow import BIDS_FILES, cohort_lesion_table, plan_study  # noqa: E402


validate(config, "../virtual_contrast/schemas/config.schema.yaml")

STUDY = plan_study(config)
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
    outputs += expand(
        "results/sub-{subject}/predict/sub-{subject}_space-{space}_desc-virtual_T1c.nii.gz",
        subject=STUDY.test_subjects,
        space=["ICBM09a", "native"],
    )
    return outputs


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


def get_reader_inputs(wildcards):
    """Real annotations when configured, else the automated reader's detections on the test subjects."""
    rs = config["reader_study"]
    if rs["lesions"]:
        return {"lesions": rs["lesions"], **({"reads": rs["reads"]} if rs["reads"] else {})}
    return {
        "detections": expand(rules.detect_lesions.output.detections, subject=STUDY.test_subjects)
    }


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
