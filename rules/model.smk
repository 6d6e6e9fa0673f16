# The model (paper, "Deep learning method"): folds of the training patients, one training job per fold on a
# GPU, and test-time-augmented prediction (8 mirror configurations x K fold models) per test patient.


rule split:
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


rule predict:
    input:
        models=expand(rules.train.output.model, fold=FOLDS),
        channels=[rules.normalize.output[c] for c in INPUT_CHANNELS],
        mask=rules.normalize.output.mask,
        normalize=rules.normalize.output.provenance,
        low_transform=lambda wc: registration_transform(wc.subject, LOW_DOSE),
        t1_transform=lambda wc: registration_transform(wc.subject, ANCHOR),
        native_mask=rules.skull_strip.output.mask,
        native=lambda wc: STUDY.raw_inputs(wc.subject)[BY_CHANNEL[LOW_DOSE].key],
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
