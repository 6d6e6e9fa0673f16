# The per-subject QC figure and provenance, the registration quality of every subject, and, when a run fails,
# the list of registrations the quality gate rejected.


rule qc:
    input:
        unpack(get_low_dose_provenance),
        t1_native=get_native_t1,
        native_mask=rules.skull_strip.output.mask,
        t1=rules.register.output.T1w,
        mask=rules.register.output.mask,
        normalized=[rules.normalize.output[c] for c in CHANNELS],
        atlas=list(ATLAS.values()),
        register=rules.register.output.provenance,
        gate=rules.registration_gate.output.verdict,
        skull_strip=rules.skull_strip.output.provenance,
    output:
        figure=report(
            layout.qc_figure("{subject}"),
            caption="report/qc.rst",
            category="2. Pre-processing QC",
            labels={"subject": "{subject}"},
        ),
        provenance=layout.provenance_file("{subject}"),
    params:
        channels=CHANNELS,
        options=PREPROCESS_OPTIONS,
        # How `auto` backends were resolved for the whole run (rules/common.smk), into provenance.json.
        backends=BACKENDS,
    group:
        "subject"
    log:
        layout.log("qc", "{subject}"),
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/qc.py"


# Every subject's figures with the verdict of the configured gate, rejected subjects included: it reads the
# registrations, not the gate's jobs (which fail for a rejected subject).
rule registration_quality:
    # Tables from tables, seconds: on a cluster it runs beside Snakemake, not as a queued job.
    localrule: True
    input:
        expand(rules.register.output.provenance, subject=SUBJECTS),
    output:
        table=report(
            layout.table("registration_quality"),
            caption="report/registration_quality.rst",
            category="2. Pre-processing QC",
        ),
    params:
        subjects=SUBJECTS,
        gate=PREPROCESS_OPTIONS["register"]["gate"],
    log:
        layout.log("registration_quality"),
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/registration_quality.py"


onerror:
    # With --keep-going the other subjects carry on; at the end, list every registration the gate rejected.
    forget_run(".snakemake")
    list_rejected_registrations(SUBJECTS)
