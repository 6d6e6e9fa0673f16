# Evaluation (paper, "Evaluation"): voxel metrics of low-T1c and vir-T1c against the full-dose reference per
# test subject, the Table 3 aggregate, mean ROC curves and Figure-4 montages; the automated lesion reader: a
# physiological-enhancement prior, its decision threshold tuned on training subjects (FROC), detections, overlays.


rule metrics:
    input:
        low=rules.normalize.output.lowT1c,
        vir=rules.predict.output.atlas,
        ref=rules.normalize.output.refT1c,
        pre=rules.normalize.output.T1w,
        flair=rules.normalize.output.FLAIR,
        adc=rules.normalize.output.ADC,
        mask=rules.normalize.output.mask,
    output:
        metrics=sub("{subject}", "metrics", "voxel_metrics.tsv"),
        roc=sub("{subject}", "metrics", "roc.tsv"),
        montage=report(
            "results/figures/montage/sub-{subject}_montage.png",
            caption="report/montage.rst",
            category="4. Voxel metrics",
            subcategory="Montages",
            labels={"subject": "{subject}"},
        ),
    log:
        "logs/metrics/sub-{subject}.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/metrics.py"


rule voxel_metrics:
    input:
        metrics=expand(rules.metrics.output.metrics, subject=STUDY.test_subjects),
        roc=expand(rules.metrics.output.roc, subject=STUDY.test_subjects),
    output:
        table=report(
            "results/tables/voxel_metrics.tsv",
            caption="report/voxel_metrics.rst",
            category="4. Voxel metrics",
        ),
        table3=report(
            "results/tables/table3.tsv", caption="report/table3.rst", category="4. Voxel metrics"
        ),
        table3_md="results/tables/table3.md",
        roc=report(
            "results/figures/roc.png", caption="report/roc.rst", category="4. Voxel metrics"
        ),
    log:
        "logs/voxel_metrics.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/voxel_metrics.py"


rule enhancement_prior:
    input:
        ref=[normalized(s)["refT1c"] for s in STUDY.train_subjects],
        pre=[normalized(s)["T1w"] for s in STUDY.train_subjects],
        mask=[normalized(s)["mask"] for s in STUDY.train_subjects],
    output:
        mask="results/models/normal_enhancement_mask.nii.gz",
    params:
        prior=config["evaluate"]["prior"],
        smoothing_mm=config["evaluate"]["detector"]["smoothing_mm"],
    log:
        "logs/enhancement_prior.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/enhancement_prior.py"


# The automated reader's decision threshold, tuned on the training subjects of the embedded cohort against
# their true lesions (FROC); detect_lesions reads it for every subject (config evaluate.detector.threshold
# with real data, which has no truth).
rule detector_froc:
    input:
        ref=[normalized(s)["refT1c"] for s in STUDY.train_subjects],
        pre=[normalized(s)["T1w"] for s in STUDY.train_subjects],
        mask=[normalized(s)["mask"] for s in STUDY.train_subjects],
        transforms=[registration_transform(s, "refT1c") for s in STUDY.train_subjects],
        truth="results/cohort/lesions.tsv",
    output:
        froc=report(
            "results/tables/detector_froc.tsv",
            caption="report/detector_froc.rst",
            category="5. Lesion detection",
        ),
        figure=report(
            "results/figures/detector_froc.png",
            caption="report/detector_froc.rst",
            category="5. Lesion detection",
        ),
        operating_point="results/tables/detector_operating_point.json",
        candidates="results/tables/detector_froc_candidates.tsv",
    params:
        subjects=STUDY.train_subjects,
        detector=config["evaluate"]["detector"],
        prior=config["evaluate"]["prior"],
        froc=config["evaluate"]["froc"],
    log:
        "logs/detector_froc.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/detector_froc.py"


rule detect_lesions:
    input:
        unpack(get_detection_images),
        unpack(get_operating_point),
        pre=rules.normalize.output.T1w,
        mask=rules.normalize.output.mask,
        prior=rules.enhancement_prior.output.mask,
    output:
        detections=sub("{subject}", "lesions", "detections.tsv"),
        labels=sub("{subject}", "lesions", "desc-detections_dseg.nii.gz"),
    params:
        detector=config["evaluate"]["detector"],
    log:
        "logs/detect_lesions/sub-{subject}.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/detect_lesions.py"


rule detector_validation:
    input:
        detections=expand(rules.detect_lesions.output.detections, subject=SUBJECTS),
        transforms=[registration_transform(s, "refT1c") for s in SUBJECTS],
        truth="results/cohort/lesions.tsv",
    output:
        table=report(
            "results/tables/detector_validation.tsv",
            caption="report/detector_validation.rst",
            category="5. Lesion detection",
        ),
    params:
        subjects=SUBJECTS,
        split=STUDY.split,
    log:
        "logs/detector_validation.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/detector_validation.py"


rule detection_overlay:
    input:
        unpack(get_detection_images),
        unpack(get_subject_truth),
        detections=rules.detect_lesions.output.detections,
        labels=rules.detect_lesions.output.labels,
    output:
        figure=report(
            "results/figures/detections/sub-{subject}_detections.png",
            caption="report/detection_overlay.rst",
            category="5. Lesion detection",
            subcategory="Detections",
            labels={"subject": "{subject}"},
        ),
    log:
        "logs/detection_overlay/sub-{subject}.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/detection_overlay.py"
