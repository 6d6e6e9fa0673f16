# Pre-processing (paper, "Pre-processing"): the ICBM 2009a atlas on the working grid; per subject, ADC from
# DWI; brain extraction on the native T1 -> brain-to-brain 12-DOF registration to the atlas (other sequences
# rigidly to the T1), one spline resampling onto its grid, the brain mask carried along -> the quality gate (its
# own step: changing its limits re-registers nothing) -> crop -> percentile normalisation.


rule atlas:
    output:
        **layout.atlas_files("{res}"),
        provenance=f"{layout.atlas_dir('{res}')}/{layout.ATLAS_PROVENANCE}",
    params:
        voxel_mm=lambda wc: float(wc.res),
        t1=config["atlas"]["t1"],
        brain_mask=config["atlas"]["brain_mask"],
        head_mask=config["atlas"]["head_mask"],
    log:
        layout.log("atlas", res="{res}mm"),
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/atlas.py"


rule adc:
    input:
        unpack(get_dwi),
    output:
        **layout.adc_files("{subject}"),
    params:
        allow_degenerate=config["preprocess"]["adc_allow_degenerate"],
    group:
        "subject"
    log:
        layout.log("adc", "{subject}"),
    benchmark:
        layout.benchmark("adc", "{subject}")
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/adc.py"


# A standard-dose study (low_dose.simulate): the quarter dose made from the pre-contrast T1 and the full-dose
# T1c, on the full-dose T1c's native grid, with noise of its own (virtual_contrast.preprocess.low_dose).
rule simulate_low_dose:
    input:
        unpack(get_simulate_low_dose_inputs),
    output:
        **layout.simulate_low_dose_files("{subject}"),
    params:
        options=config["low_dose"],
        # The rigid alignment of the pre-contrast T1 to the T1c uses the run's registration backend.
        backend=PREPROCESS_OPTIONS["register"]["backend"],
    threads: 1
    group:
        "subject"
    log:
        layout.log("simulate_low_dose", "{subject}"),
    benchmark:
        layout.benchmark("simulate_low_dose", "{subject}")
    conda:
        "../envs/registration.yaml"
    script:
        "../workflow_scripts/simulate_low_dose.py"


rule skull_strip:
    input:
        t1=get_native_t1,
    output:
        **layout.skull_strip_files("{subject}"),
    params:
        options=PREPROCESS_OPTIONS["skull_strip"],
    threads: 2
    resources:
        mem_mb=4000,
    group:
        "subject"
    log:
        layout.log("skull_strip", "{subject}"),
    benchmark:
        layout.benchmark("skull_strip", "{subject}")
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
        **layout.register_files("{subject}", CHANNELS),
        transforms=[layout.transform_file("{subject}", c) for c in CHANNELS],
    params:
        # The backend only: the gate's limits are rule registration_gate's, so changing them re-registers nothing.
        backend=PREPROCESS_OPTIONS["register"]["backend"],
        channels=CHANNELS,
        alignment=register_alignment(),
        align_features=register_features(),
    # One: the embedded backend runs ITK on one thread, so that a registration is the same to the bit on every
    # run (with more, the metric's sums follow the threads' schedule); subjects run side by side instead.
    threads: 1
    resources:
        mem_mb=4000,
    group:
        "subject"
    log:
        layout.log("register", "{subject}"),
    benchmark:
        layout.benchmark("register", "{subject}")
    conda:
        "../envs/registration.yaml"
    script:
        "../workflow_scripts/register.py"


rule registration_gate:
    input:
        register=rules.register.output.provenance,
        t1=rules.register.output.T1w,
        mask=rules.register.output.mask,
        atlas_brain_mask=ATLAS["brain_mask"],
    output:
        verdict=layout.registration_gate_file("{subject}"),
    params:
        gate=PREPROCESS_OPTIONS["register"]["gate"],
        # Not an output: drawn only when the gate rejects the registration (the job then fails).
        rejected_figure=lambda wc: layout.rejected_registration(wc.subject),
    group:
        "subject"
    log:
        layout.log("registration_gate", "{subject}"),
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/registration_gate.py"


rule crop:
    input:
        **{c: rules.register.output[c] for c in CHANNELS},
        # Order only (ancient: its date is not compared): a verdict rewritten with new limits that the subject
        # still passes reruns nothing downstream; a rejection stops the subject here.
        gate=ancient(rules.registration_gate.output.verdict),
        mask=rules.register.output.mask,
        atlas_brain_mask=ATLAS["brain_mask"],
    output:
        **layout.crop_files("{subject}", CHANNELS),
    params:
        shape=config["grid"]["crop_shape"],
        channels=CHANNELS,
    group:
        "subject"
    log:
        layout.log("crop", "{subject}"),
    benchmark:
        layout.benchmark("crop", "{subject}")
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/crop.py"


rule normalize:
    input:
        **{c: rules.crop.output[c] for c in CHANNELS},
        mask=rules.crop.output.mask,
    output:
        **layout.normalize_files("{subject}", CHANNELS),
    params:
        percentiles=PREPROCESS_OPTIONS["normalize_percentiles"],
        channels=CHANNELS,
    group:
        "subject"
    log:
        layout.log("normalize", "{subject}"),
    benchmark:
        layout.benchmark("normalize", "{subject}")
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/normalize.py"
