# Exclusions and flow chart (the paper's Figure 2), the per-subject QC figure and provenance, the registration
# quality of every subject, and, when a run fails, the list of registrations the quality gate rejected.


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
        t1_native=get_native_t1,
        native_mask=rules.skull_strip.output.mask,
        t1=rules.register.output.T1w,
        mask=rules.register.output.mask,
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
        options=PREPROCESS_OPTIONS,
    group:
        "subject"
    log:
        "logs/qc/sub-{subject}.log",
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/qc.py"


rule registration_quality:
    input:
        expand(rules.register.output.provenance, subject=SUBJECTS),
    output:
        table=report(
            "results/tables/registration_quality.tsv",
            caption="report/registration_quality.rst",
            category="2. Pre-processing QC",
        ),
    params:
        subjects=SUBJECTS,
    log:
        "logs/registration_quality.log",
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/registration_quality.py"


onerror:
    # With --keep-going the other subjects carry on; at the end, list every registration the gate rejected.
    list_rejected_registrations(SUBJECTS)
