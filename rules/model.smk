# The model (paper, "Deep learning method"): folds of the training patients, one training job per fold on a
# GPU, and test-time-augmented prediction (8 mirror configurations x K fold models) per test patient, with its
# uncertainty map calibrated on the training subjects' out-of-fold predictions (not in the paper).


rule split:
    # Tables from tables, seconds: on a cluster it runs beside Snakemake, not as a queued job.
    localrule: True
    output:
        folds=layout.table("folds"),
    params:
        subjects=STUDY.split_table().to_dict("records"),
        k=config["split"]["folds"],
        seed=config["split"]["seed"],
    log:
        layout.log("split"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/split.py"


rule train:
    input:
        folds=rules.split.output.folds,
        volumes=get_training_volumes,
    output:
        model=layout.model_files("{fold}")["model"],
        log=report(
            layout.model_files("{fold}")["log"],
            caption="report/train_log.rst",
            category="3. Training",
            labels={"fold": "{fold}", "figure": "log"},
        ),
        curve=report(
            layout.model_files("{fold}")["curve"],
            caption="report/loss_curve.rst",
            category="3. Training",
            labels={"fold": "{fold}", "figure": "loss curve"},
        ),
    params:
        # Not an output: Snakemake deletes a failed job's outputs, and a preempted job resumes from here.
        checkpoint_dir=layout.checkpoint_dir("{fold}"),
        cache_dir=layout.TRAINING_CACHE,
        config=lambda wc: train_config(),
        # input.volumes holds, for each of these subjects in turn, one file per key.
        subjects=STUDY.train_subjects,
        volume_keys=training_volume_keys(),
        # Stored in model.pt: `virtual-contrast predict` pre-processes a raw exam with the same options.
        preprocess=PREPROCESS_OPTIONS,
    threads: config["train"]["threads"]
    resources:
        gpu=1,
        mem_mb=config["train"]["mem_mb"],
        runtime=config["train"]["runtime_min"],
    log:
        layout.log("train", fold="{fold}"),
    benchmark:
        layout.benchmark("train", fold="{fold}")
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/train.py"


# Each training subject predicted by the one fold model that tuned on it (out of fold): what the uncertainty
# calibration is fitted on, and the training subjects' side of the per-lesion comparison.
rule predict_out_of_fold:
    input:
        models=expand(rules.train.output.model, fold=FOLDS),
        folds=rules.split.output.folds,
        channels=[rules.normalize.output[c] for c in INPUT_CHANNELS],
        mask=rules.normalize.output.mask,
    output:
        atlas=layout.out_of_fold_files("{subject}")["atlas"],
        spread=layout.out_of_fold_files("{subject}")["spread"],
    params:
        channels=INPUT_CHANNELS,
        folds=FOLDS,
        device=config["predict"]["device"],
        flips="all8" if config["predict"]["tta"] else "none",
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=30,
    log:
        layout.log("predict_out_of_fold", "{subject}"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/predict_out_of_fold.py"


rule calibrate_uncertainty:
    input:
        vir=expand(rules.predict_out_of_fold.output.atlas, subject=STUDY.train_subjects),
        spread=expand(rules.predict_out_of_fold.output.spread, subject=STUDY.train_subjects),
        low=[normalized(s)[LOW_DOSE] for s in STUDY.train_subjects],
        pre=[normalized(s)[ANCHOR] for s in STUDY.train_subjects],
        ref=[normalized(s)[TARGET] for s in STUDY.train_subjects],
        mask=[normalized(s)["mask"] for s in STUDY.train_subjects],
    output:
        calibration=layout.UNCERTAINTY_CALIBRATION,
    params:
        subjects=STUDY.train_subjects,
    threads: 2
    log:
        layout.log("calibrate_uncertainty"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/calibrate_uncertainty.py"


rule out_of_fold_uncertainty:
    input:
        calibration=rules.calibrate_uncertainty.output.calibration,
        vir=rules.predict_out_of_fold.output.atlas,
        spread=rules.predict_out_of_fold.output.spread,
        low=rules.normalize.output[LOW_DOSE],
        pre=rules.normalize.output[ANCHOR],
        mask=rules.normalize.output.mask,
    output:
        uncertainty=layout.out_of_fold_files("{subject}")["uncertainty"],
    log:
        layout.log("out_of_fold_uncertainty", "{subject}"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/out_of_fold_uncertainty.py"


rule predict:
    input:
        models=expand(rules.train.output.model, fold=FOLDS),
        calibration=rules.calibrate_uncertainty.output.calibration,
        low=rules.normalize.output[LOW_DOSE],
        pre=rules.normalize.output[ANCHOR],
        channels=[rules.normalize.output[c] for c in INPUT_CHANNELS],
        mask=rules.normalize.output.mask,
        normalize=rules.normalize.output.provenance,
        low_transform=lambda wc: registration_transform(wc.subject, LOW_DOSE),
        t1_transform=lambda wc: registration_transform(wc.subject, ANCHOR),
        native_mask=rules.skull_strip.output.mask,
        native=lambda wc: STUDY.raw_inputs(wc.subject)[BY_CHANNEL[LOW_DOSE].key],
        t1=get_native_t1,
    output:
        **layout.predict_files("{subject}"),
    params:
        channels=INPUT_CHANNELS,
        low_dose=LOW_DOSE,
        device=config["predict"]["device"],
        flips="all8" if config["predict"]["tta"] else "none",
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=30,
    log:
        layout.log("predict", "{subject}"),
    benchmark:
        layout.benchmark("predict", "{subject}")
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/predict.py"
