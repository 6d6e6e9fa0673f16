# virtual-contrast: virtual contrast-enhanced T1 MRI (Ammari, Bône et al., Invest Radiol 2021).
# This file is the table of contents; rules live in rules/, logic in the virtual_contrast package.
#
#     snakemake --cores 4                                        # embedded cohort, demo scale
#     snakemake --configfile config.yaml tests/tiny.yaml -c2     # the tests' tiny scale
#     snakemake --configfile config.yaml config.paper.yaml ...   # the paper's settings

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "rules/report/workflow.rst"


include: "rules/common.smk"
include: "rules/cohort.smk"
include: "rules/preprocess.smk"
include: "rules/qc.smk"
include: "rules/model.smk"
include: "rules/evaluate.smk"
include: "rules/reader_study.smk"
include: "rules/dicom.smk"


rule all:
    input:
        get_final_outputs(),
    default_target: True


# What the requested targets need of the study (enough training and test subjects), checked before any job.
check_requested_targets()
