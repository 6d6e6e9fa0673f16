# Evaluation (paper, "Evaluation"): voxel metrics of low-T1c and vir-T1c against the full-dose reference per
# test subject, the Table 3 aggregate, mean ROC curves and Figure-4 montages; the automated lesion reader: a
# physiological-enhancement prior, its decision threshold tuned on training subjects (FROC), detections, overlays.


rule metrics:
    input:
        # The montage's other columns: the study's other channels (FLAIR, ADC, T2w as configured).
        **{c: rules.normalize.output[c] for c in CHANNELS if c not in ALWAYS_NEEDED},
        low=rules.normalize.output[LOW_DOSE],
        vir=rules.predict.output.atlas,
        uncertainty=rules.predict.output.uncertainty,
        ref=rules.normalize.output[TARGET],
        pre=rules.normalize.output[ANCHOR],
        mask=rules.normalize.output.mask,
    output:
        **layout.metrics_files("{subject}"),
        montage=report(
            layout.figure("montage", "{subject}"),
            caption="report/montage.rst",
            category="4. Voxel metrics",
            subcategory="Montages",
            labels={"subject": "{subject}"},
        ),
    params:
        other_channels=[c for c in CHANNELS if c not in ALWAYS_NEEDED],
        labels=IMAGE_LABELS,
    log:
        layout.log("metrics", "{subject}"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/metrics.py"


rule voxel_metrics:
    # Tables from tables, seconds: on a cluster it runs beside Snakemake, not as a queued job.
    localrule: True
    input:
        metrics=expand(rules.metrics.output.metrics, subject=STUDY.test_subjects),
        roc=expand(rules.metrics.output.roc, subject=STUDY.test_subjects),
    output:
        table=report(
            layout.table("voxel_metrics"),
            caption="report/voxel_metrics.rst",
            category="4. Voxel metrics",
        ),
        table3=report(
            layout.table("table3"), caption="report/table3.rst", category="4. Voxel metrics"
        ),
        table3_md=layout.table("table3", ".md"),
        roc=report(layout.figure("roc"), caption="report/roc.rst", category="4. Voxel metrics"),
    params:
        labels=IMAGE_LABELS,
    log:
        layout.log("voxel_metrics"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/voxel_metrics.py"


rule enhancement_prior:
    input:
        ref=[normalized(s)[TARGET] for s in STUDY.train_subjects],
        pre=[normalized(s)[ANCHOR] for s in STUDY.train_subjects],
        mask=[normalized(s)["mask"] for s in STUDY.train_subjects],
    output:
        mask=layout.ENHANCEMENT_PRIOR,
    params:
        prior=config["evaluate"]["prior"],
        smoothing_mm=config["evaluate"]["detector"]["smoothing_mm"],
    log:
        layout.log("enhancement_prior"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/enhancement_prior.py"


# The automated reader's decision threshold, tuned on the training subjects of the embedded cohort against
# their true lesions (FROC); detect_lesions reads it for every subject (config evaluate.detector.threshold
# with real data, which has no truth).
rule detector_froc:
    input:
        ref=[normalized(s)[TARGET] for s in STUDY.train_subjects],
        pre=[normalized(s)[ANCHOR] for s in STUDY.train_subjects],
        mask=[normalized(s)["mask"] for s in STUDY.train_subjects],
        transforms=[registration_transform(s, TARGET) for s in STUDY.train_subjects],
        truth=rules.cohort_truth.output.lesions,
    output:
        froc=report(
            layout.table("detector_froc"),
            caption="report/detector_froc.rst",
            category="5. Lesion detection",
        ),
        figure=report(
            layout.figure("detector_froc"),
            caption="report/detector_froc.rst",
            category="5. Lesion detection",
        ),
        operating_point=layout.table("detector_operating_point", ".json"),
        candidates=layout.table("detector_froc_candidates"),
    params:
        subjects=STUDY.train_subjects,
        detector=config["evaluate"]["detector"],
        prior=config["evaluate"]["prior"],
        froc=config["evaluate"]["froc"],
    log:
        layout.log("detector_froc"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/detector_froc.py"


rule detect_lesions:
    input:
        unpack(get_detection_images),
        unpack(get_operating_point),
        unpack(get_uncertainty),
        pre=rules.normalize.output[ANCHOR],
        mask=rules.normalize.output.mask,
        prior=rules.enhancement_prior.output.mask,
    output:
        **layout.lesion_files("{subject}"),
    params:
        detector=config["evaluate"]["detector"],
    log:
        layout.log("detect_lesions", "{subject}"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/detect_lesions.py"


rule detector_validation:
    input:
        detections=expand(rules.detect_lesions.output.detections, subject=SUBJECTS),
        transforms=[registration_transform(s, TARGET) for s in SUBJECTS],
        truth=rules.cohort_truth.output.lesions,
    output:
        table=report(
            layout.table("detector_validation"),
            caption="report/detector_validation.rst",
            category="5. Lesion detection",
        ),
    params:
        subjects=SUBJECTS,
        split=STUDY.split,
    log:
        layout.log("detector_validation"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/detector_validation.py"


rule detection_overlay:
    input:
        unpack(get_detection_images),
        unpack(get_subject_truth),
        unpack(get_uncertainty),
        detections=rules.detect_lesions.output.detections,
        labels=rules.detect_lesions.output.labels,
    output:
        figure=report(
            layout.figure("detections", "{subject}"),
            caption="report/detection_overlay.rst",
            category="5. Lesion detection",
            subcategory="Detections",
            labels={"subject": "{subject}"},
        ),
    params:
        labels=IMAGE_LABELS,
    log:
        layout.log("detection_overlay", "{subject}"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/detection_overlay.py"


# The uncertainty map (rule predict) on the held-out patients: how well it ranks vir-T1c's voxel errors against
# the raw spreads of the passes, and a reliability figure. Its calibration saw training subjects only.
rule uncertainty_calibration:
    input:
        vir=expand(rules.predict.output.atlas, subject=STUDY.test_subjects),
        uncertainty=expand(rules.predict.output.uncertainty, subject=STUDY.test_subjects),
        spread=expand(rules.predict.output.spread, subject=STUDY.test_subjects),
        ref=[normalized(s)[TARGET] for s in STUDY.test_subjects],
        mask=[normalized(s)["mask"] for s in STUDY.test_subjects],
    output:
        table=layout.table("uncertainty_calibration"),
        summary=report(
            layout.table("uncertainty_calibration_summary"),
            caption="report/uncertainty_calibration.rst",
            category="6. Uncertainty",
        ),
        reliability=layout.table("uncertainty_reliability"),
        figure=report(
            layout.figure("uncertainty_reliability"),
            caption="report/uncertainty_reliability.rst",
            category="6. Uncertainty",
        ),
    params:
        subjects=STUDY.test_subjects,
    log:
        layout.log("uncertainty_calibration"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/uncertainty_calibration.py"


# Per lesion (embedded cohort: true lesions known): do vir-T1c's false positives and the lesions it missed carry
# more uncertainty than its true positives? Training subjects out of fold and test patients, separately.
rule uncertainty_lesions:
    input:
        detections=expand(rules.detect_lesions.output.detections, subject=SUBJECTS),
        labels=expand(rules.detect_lesions.output.labels, subject=SUBJECTS),
        uncertainty=[uncertainty_map_of(s) for s in SUBJECTS],
        spread=[spread_of(s) for s in SUBJECTS],
        transforms=[registration_transform(s, TARGET) for s in SUBJECTS],
        truth=rules.cohort_truth.output.lesions,
    output:
        table=layout.table("uncertainty_lesions"),
        summary=report(
            layout.table("uncertainty_lesions_summary"),
            caption="report/uncertainty_lesions.rst",
            category="6. Uncertainty",
        ),
    params:
        subjects=SUBJECTS,
        split=STUDY.split,
    log:
        layout.log("uncertainty_lesions"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/uncertainty_lesions.py"
