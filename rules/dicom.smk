# DICOM in and out (config dicom_dir): each exam's chosen series converted with dcm2niix into the BIDS-like
# layout the other rules read, and vir-T1c written back as a derived DICOM series over the low-dose series.


rule import_dicom:
    input:
        # Written at parse time from the exam's headers (virtual_contrast.dicom.study): series, roles, files.
        manifest=str(layout.dicom_exam_record("{subject}", "{session}", "series.json")),
    output:
        **dicom_import_outputs(),
    params:
        series_map=config["dicom"]["series_map"],
        # The series the study needs (virtual_contrast.sequences); an exam without one stops its import.
        require=list(STUDY.raw_keys),
    log:
        layout.log("import_dicom", "{subject}", "{session}"),
    conda:
        "../envs/dicom.yaml"
    script:
        "../workflow_scripts/import_dicom.py"


rule export_dicom:
    input:
        image=rules.predict.output.native,
        uncertainty=rules.predict.output.uncertainty_native,
        manifest=get_dicom_manifest,
        models=expand(rules.train.output.model, fold=FOLDS),
    output:
        series=directory(layout.export_dicom_dir("{subject}")),
        uncertainty=directory(layout.export_dicom_uncertainty_dir("{subject}")),
    params:
        tta=config["predict"]["tta"],
    log:
        layout.log("export_dicom", "{subject}"),
    conda:
        "../envs/dicom.yaml"
    script:
        "../workflow_scripts/export_dicom.py"
