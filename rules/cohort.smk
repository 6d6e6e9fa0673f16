# The atlas on the working grid, and the embedded synthetic cohort (used when no data is configured).


rule atlas:
    output:
        **atlas_files("{res}"),
        provenance="results/atlas/res-{res}mm/provenance.json",
    params:
        voxel_mm=lambda wc: float(wc.res),
        t1=config["atlas"]["t1"],
        brain_mask=config["atlas"]["brain_mask"],
        head_mask=config["atlas"]["head_mask"],
    log:
        "logs/atlas/res-{res}mm.log",
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/atlas.py"


# One job per synthetic exam. Only complete exams are made by the workflow (the excluded ones of the plan are
# listed in exclusions.tsv from the plan); `virtual-contrast cohort` writes the whole tree, excluded exams too.
rule cohort:
    input:
        atlas=list(COHORT_ATLAS.values()),
    output:
        **{
            key: f"results/cohort/sub-{{subject}}/ses-{{session}}/{pattern.format(p='sub-{subject}_ses-{session}')}"
            for key, pattern in BIDS_FILES.items()
        },
        lesions=str(cohort_lesion_table("{subject}", "{session}")),
    params:
        seed=config["cohort"]["seed"],
        native_voxel_mm=config["cohort"]["native_voxel_mm"],
    # On a cluster a subject's whole chain is one submission (no effect locally).
    group:
        "subject"
    log:
        "logs/cohort/sub-{subject}_ses-{session}.log",
    benchmark:
        "results/benchmarks/cohort/sub-{subject}_ses-{session}.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/cohort.py"


rule cohort_truth:
    input:
        STUDY.cohort_lesion_tables(),
    output:
        lesions="results/cohort/lesions.tsv",
    log:
        "logs/cohort_truth.log",
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/cohort_truth.py"
