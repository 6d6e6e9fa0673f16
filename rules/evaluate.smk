# Evaluation (paper, "Evaluation"): voxel metrics of low-T1c and vir-T1c against the full-dose reference per
# test subject, the Table 3 aggregate, mean ROC curves and Figure-4 montages; automated lesion detection.


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
        threshold=config["evaluate"]["detection_threshold"],
    log:
        "logs/enhancement_prior.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/enhancement_prior.py"


rule detect_lesions:
    input:
        unpack(get_detection_images),
        pre=rules.normalize.output.T1w,
        mask=rules.normalize.output.mask,
        exclude=rules.enhancement_prior.output.mask,
    output:
        detections=sub("{subject}", "lesions", "detections.tsv"),
    params:
        threshold=config["evaluate"]["detection_threshold"],
        min_volume_mm3=config["evaluate"]["min_lesion_volume_mm3"],
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
    log:
        "logs/detector_validation.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/detector_validation.py"
