# Exclusions and flow chart (the paper's Figure 2), and the per-subject QC figure and provenance.


rule exclusions:
    output:
        table=report(
            "results/tables/exclusions.tsv",
            caption="report/exclusions.rst",
            category="1. Cohort",
        ),
        flowchart=report(
            "results/figures/flowchart.png",
            caption="report/flowchart.rst",
            category="1. Cohort",
        ),
    params:
        excluded=STUDY.selection.excluded.to_dict("records"),
        counts=flowchart_counts(STUDY.selection),
    log:
        "logs/exclusions.log",
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/exclusions.py"


rule qc:
    input:
        t1=rules.register.output.T1w,
        mask=rules.skull_strip.output.mask,
        normalized=[rules.normalize.output[c] for c in CHANNELS],
        atlas=list(ATLAS.values()),
        register=rules.register.output.provenance,
        skull_strip=rules.skull_strip.output.provenance,
    output:
        figure=report(
            "results/sub-{subject}/sub-{subject}_qc.png",
            caption="report/qc.rst",
            category="2. Pre-processing QC",
            labels={"subject": "{subject}"},
        ),
        provenance="results/sub-{subject}/provenance.json",
    params:
        channels=CHANNELS,
    group:
        "subject"
    log:
        "logs/qc/sub-{subject}.log",
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/qc.py"
