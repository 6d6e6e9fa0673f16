# DICOM in and out (config dicom_dir): each exam's chosen series converted with dcm2niix into the BIDS-like
# layout the other rules read, and vir-T1c written back as a derived DICOM series over the low-dose series.


rule import_dicom:
    input:
        # Written at parse time from the exam's headers (virtual_contrast.dicom.study): series, roles, files.
        manifest=dicom_exam_record("{subject}", "{session}", "series.json"),
    output:
        **dicom_import_outputs(),
    params:
        series_map=config["dicom"]["series_map"],
    log:
        "logs/import_dicom/sub-{subject}_ses-{session}.log",
    conda:
        "../envs/dicom.yaml"
    script:
        "../workflow_scripts/import_dicom.py"


rule export_dicom:
    input:
        image=rules.predict.output.native,
        manifest=get_dicom_manifest,
        models=expand(rules.train.output.model, fold=FOLDS),
    output:
        series=directory(sub("{subject}", "export_dicom", "desc-virtual_T1c")),
    params:
        tta=config["predict"]["tta"],
    log:
        "logs/export_dicom/sub-{subject}.log",
    conda:
        "../envs/dicom.yaml"
    script:
        "../workflow_scripts/export_dicom.py"
