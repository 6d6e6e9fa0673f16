# The reader study (paper, "Reader study" and "Statistical analysis"): the automated reader `auto` (or real
# reads from the config), lesion-detection statistics (Table 5), reading lists, demographics (Table 1).


rule reader_stats:
    input:
        unpack(get_reader_inputs),
    output:
        detection=report(
            "results/reader_study/detection.tsv",
            caption="report/detection.rst",
            category="5. Lesion detection",
        ),
        comparisons="results/reader_study/comparisons.tsv",
        quality="results/reader_study/quality.tsv",
        reading_times="results/reader_study/reading_times.tsv",
        table5=report(
            "results/reader_study/table5.html",
            caption="report/table5.rst",
            category="5. Lesion detection",
        ),
        table5_md="results/reader_study/table5.md",
    params:
        reference_reader=config["reader_study"]["reference_reader"] or None,
        thresholds=config["reader_study"]["thresholds"],
    log:
        "logs/reader_stats.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/reader_stats.py"


rule reading_lists:
    input:
        unpack(get_reading_sources),
        vir=expand(rules.predict.output.atlas, subject=STUDY.test_subjects),
        low=[normalized(s)["lowT1c"] for s in STUDY.test_subjects],
        ref=[normalized(s)["refT1c"] for s in STUDY.test_subjects],
        t1=[normalized(s)["T1w"] for s in STUDY.test_subjects],
        flair=[normalized(s)["FLAIR"] for s in STUDY.test_subjects],
    output:
        key="results/reader_study/reading_key.tsv",
        lists=directory("results/reader_study/reading_lists"),
    params:
        patients=STUDY.test_subjects,
        readers=config["reader_study"]["readers"],
        reference_reader=reading_lists_reference_reader(),
        seed=config["split"]["seed"],
        image_format=reading_image_format(),
    log:
        "logs/reading_lists.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/reading_lists.py"


rule demographics:
    output:
        table=report(
            "results/tables/demographics.tsv",
            caption="report/demographics.rst",
            category="1. Cohort",
        ),
        markdown="results/tables/demographics.md",
    params:
        subjects=STUDY.demographics(config["cohort"]["seed"]).to_dict("records"),
    log:
        "logs/demographics.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/demographics.py"


# Embedded cohort: the same statistics with the cohort's true lesions as the reference reader `truth`, so that
# Table 5 shows `auto` reading low-T1c and vir-T1c against the truth beside the auto-vs-auto table above.
rule reader_stats_truth:
    input:
        detections=expand(rules.detect_lesions.output.detections, subject=STUDY.test_subjects),
        transforms=[registration_transform(s, "refT1c") for s in STUDY.test_subjects],
        truth="results/cohort/lesions.tsv",
    output:
        detection=report(
            "results/reader_study/reference-truth/detection.tsv",
            caption="report/detection_truth.rst",
            category="5. Lesion detection",
        ),
        comparisons="results/reader_study/reference-truth/comparisons.tsv",
        quality="results/reader_study/reference-truth/quality.tsv",
        reading_times="results/reader_study/reference-truth/reading_times.tsv",
        table5=report(
            "results/reader_study/reference-truth/table5.html",
            caption="report/table5_truth.rst",
            category="5. Lesion detection",
        ),
        table5_md="results/reader_study/reference-truth/table5.md",
    params:
        subjects=STUDY.test_subjects,
        thresholds=config["reader_study"]["thresholds"],
    log:
        "logs/reader_stats_truth.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../workflow_scripts/reader_stats_truth.py"
