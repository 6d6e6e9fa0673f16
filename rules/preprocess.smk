# Per-subject pre-processing (paper, "Pre-processing"): ADC from DWI; brain extraction on the native T1 ->
# brain-to-brain 12-DOF registration to the ICBM 2009a atlas (other sequences rigidly to the T1), one spline
# resampling onto its grid, the brain mask carried along, a quality gate -> crop -> percentile normalisation.


rule adc:
    input:
        unpack(get_dwi),
    output:
        adc=sub("{subject}", "adc", "space-dwi_ADC.nii.gz"),
        b0=sub("{subject}", "adc", "space-dwi_desc-b0_dwi.nii.gz"),
    params:
        allow_degenerate=config["preprocess"]["adc_allow_degenerate"],
    group:
        "subject"
    log:
        "logs/adc/sub-{subject}.log",
    benchmark:
        "results/benchmarks/adc/sub-{subject}.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/adc.py"


rule skull_strip:
    input:
        t1=get_native_t1,
    output:
        mask=sub("{subject}", "skull_strip", "space-T1w_desc-brain_mask.nii.gz"),
        provenance=sub("{subject}", "skull_strip", "skull_strip.json"),
    params:
        options=PREPROCESS_OPTIONS["skull_strip"],
    threads: 2
    resources:
        mem_mb=4000,
    group:
        "subject"
    log:
        "logs/skull_strip/sub-{subject}.log",
    benchmark:
        "results/benchmarks/skull_strip/sub-{subject}.tsv"
    conda:
        "../envs/brain_extraction.yaml"
    script:
        "../workflow_scripts/skull_strip.py"


rule register:
    input:
        unpack(get_register_inputs),
        mask=rules.skull_strip.output.mask,
        atlas=list(ATLAS.values()),
    output:
        **{c: sub("{subject}", "register", f"space-ICBM09a_{c}.nii.gz") for c in CHANNELS},
        transforms=expand(
            sub("{{subject}}", "register", "from-{channel}_to-ICBM09a_xfm.txt"), channel=CHANNELS
        ),
        mask=sub("{subject}", "register", "space-ICBM09a_desc-brain_mask.nii.gz"),
        provenance=sub("{subject}", "register", "register.json"),
    params:
        options=PREPROCESS_OPTIONS["register"],
        channels=CHANNELS,
        # Not an output: drawn only when the quality gate rejects the registration (the job then fails).
        rejected_figure=lambda wc: sub(wc.subject, "register", "desc-rejected_registration.png"),
    threads: 2
    resources:
        mem_mb=4000,
    group:
        "subject"
    log:
        "logs/register/sub-{subject}.log",
    benchmark:
        "results/benchmarks/register/sub-{subject}.tsv"
    conda:
        "../envs/registration.yaml"
    script:
        "../workflow_scripts/register.py"


rule crop:
    input:
        **{c: rules.register.output[c] for c in CHANNELS},
        mask=rules.register.output.mask,
        atlas_brain_mask=ATLAS["brain_mask"],
    output:
        **{c: sub("{subject}", "crop", f"desc-crop_{c}.nii.gz") for c in CHANNELS},
        mask=sub("{subject}", "crop", "desc-brain_mask.nii.gz"),
    params:
        shape=config["grid"]["crop_shape"],
        channels=CHANNELS,
    group:
        "subject"
    log:
        "logs/crop/sub-{subject}.log",
    benchmark:
        "results/benchmarks/crop/sub-{subject}.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/crop.py"


rule normalize:
    input:
        **{c: rules.crop.output[c] for c in CHANNELS},
        mask=rules.crop.output.mask,
    output:
        **{c: sub("{subject}", "normalize", f"desc-norm_{c}.nii.gz") for c in CHANNELS},
        mask=sub("{subject}", "normalize", "desc-brain_mask.nii.gz"),
        provenance=sub("{subject}", "normalize", "normalize.json"),
    params:
        percentiles=PREPROCESS_OPTIONS["normalize_percentiles"],
        channels=CHANNELS,
    group:
        "subject"
    log:
        "logs/normalize/sub-{subject}.log",
    benchmark:
        "results/benchmarks/normalize/sub-{subject}.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/normalize.py"
