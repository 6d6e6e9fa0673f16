# The reader study (paper, "Reader study" and "Statistical analysis"): the automated reader `auto` (or real
# reads from the config), lesion-detection statistics (Table 5), reading lists, demographics (Table 1).


rule reader_stats:
    # Tables from tables, seconds: on a cluster it runs beside Snakemake, not as a queued job.
    localrule: True
    input:
        unpack(get_reader_inputs),
    output:
        **reader_stats_outputs(layout.READER_STUDY, "detection", "table5"),
    params:
        # Whose detections input.detections holds, in order (the automated reader).
        subjects=STUDY.test_subjects,
        reference_reader=config["reader_study"]["reference_reader"] or None,
        thresholds=config["reader_study"]["thresholds"],
        labels=IMAGE_LABELS,
    log:
        layout.log("reader_stats"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/reader_stats.py"


rule reading_lists:
    input:
        unpack(get_reading_sources),
        unpack(get_reading_companions),
        vir=expand(rules.predict.output.atlas, subject=STUDY.test_subjects),
        low=[normalized(s)[LOW_DOSE] for s in STUDY.test_subjects],
        ref=[normalized(s)[TARGET] for s in STUDY.test_subjects],
    output:
        key=layout.reading_files()["key"],
        lists=directory(layout.reading_files()["lists"]),
    params:
        patients=STUDY.test_subjects,
        readers=config["reader_study"]["readers"],
        reference_reader=reading_lists_reference_reader(),
        seed=config["split"]["seed"],
        image_format=reading_image_format(),
    log:
        layout.log("reading_lists"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/reading_lists.py"


rule demographics:
    # Tables from tables, seconds: on a cluster it runs beside Snakemake, not as a queued job.
    localrule: True
    output:
        table=report(
            layout.table("demographics"),
            caption="report/demographics.rst",
            category="1. Cohort",
        ),
        markdown=layout.table("demographics", ".md"),
    params:
        subjects=STUDY.demographics(config["cohort"]["seed"]).to_dict("records"),
    log:
        layout.log("demographics"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/demographics.py"


# Embedded cohort: the same statistics with the cohort's true lesions as the reference reader `truth`, so that
# Table 5 shows `auto` reading low-T1c and vir-T1c against the truth beside the auto-vs-auto table above.
rule reader_stats_truth:
    # Tables from tables, seconds: on a cluster it runs beside Snakemake, not as a queued job.
    localrule: True
    input:
        detections=expand(rules.detect_lesions.output.detections, subject=STUDY.test_subjects),
        transforms=[registration_transform(s, TARGET) for s in STUDY.test_subjects],
        truth=rules.cohort_truth.output.lesions,
    output:
        **reader_stats_outputs(f"{layout.READER_STUDY}/reference-truth", "detection_truth", "table5_truth"),
    params:
        subjects=STUDY.test_subjects,
        thresholds=config["reader_study"]["thresholds"],
        labels=IMAGE_LABELS,
    log:
        layout.log("reader_stats_truth"),
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/reader_stats_truth.py"
