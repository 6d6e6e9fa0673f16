# The cohort: the exams included and excluded with their reasons (the paper's Figure 2), and the embedded
# synthetic cohort (used when no data is configured).


rule exclusions:
    # Tables from tables, seconds: on a cluster it runs beside Snakemake, not as a queued job.
    localrule: True
    output:
        table=report(
            layout.table("exclusions"),
            caption="report/exclusions.rst",
            category="1. Cohort",
        ),
        flowchart=report(
            layout.figure("flowchart"),
            caption="report/flowchart.rst",
            category="1. Cohort",
        ),
        exams=layout.table("exams"),
    params:
        excluded=STUDY.selection.excluded.to_dict("records"),
        exams=STUDY.source_ids().to_dict("records"),
        counts=flowchart_counts(STUDY.selection),
    log:
        layout.log("exclusions"),
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/exclusions.py"


# One job per synthetic exam. Only complete exams are made by the workflow (the excluded ones of the plan are
# listed in exclusions.tsv from the plan); `virtual-contrast cohort` writes the whole tree, excluded exams too.
rule cohort:
    input:
        atlas=list(COHORT_ATLAS.values()),
    output:
        **{
            key: str(path)
            for key, path in layout.bids_exam_files(
                layout.COHORT_DIR, "{subject}", "{session}"
            ).items()
        },
        lesions=str(layout.cohort_lesion_table("{subject}", "{session}")),
    params:
        seed=config["cohort"]["seed"],
        native_voxel_mm=config["cohort"]["native_voxel_mm"],
    # On a cluster a subject's whole chain is one submission (no effect locally).
    group:
        "subject"
    log:
        layout.log("cohort", "{subject}", "{session}"),
    benchmark:
        layout.benchmark("cohort", "{subject}", "{session}")
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/cohort.py"


rule cohort_truth:
    # Tables from tables, seconds: on a cluster it runs beside Snakemake, not as a queued job.
    localrule: True
    input:
        STUDY.cohort_lesion_tables(),
    output:
        lesions=layout.COHORT_TRUTH,
    log:
        layout.log("cohort_truth"),
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/cohort_truth.py"
