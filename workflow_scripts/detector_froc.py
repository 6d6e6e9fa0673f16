import pandas as pd
from _common import setup

from virtual_contrast.evaluate.figures import plot_froc
from virtual_contrast.evaluate.froc import threshold_grid, truth_in_atlas, tune_detector
from virtual_contrast.evaluate.lesions import DetectorSettings
from virtual_contrast.io import load_array, write_json, write_table
from virtual_contrast.preprocess.transforms import load_transform

log = setup(snakemake)
inp, params = snakemake.input, snakemake.params
subjects = list(params.subjects)
paths = {s: (inp.ref[i], inp.pre[i], inp.mask[i]) for i, s in enumerate(subjects)}


def load(subject):
    post, affine = load_array(paths[subject][0], subject=subject)
    pre = load_array(paths[subject][1], subject=subject)[0]
    return post, pre, load_array(paths[subject][2], subject=subject)[0] > 0, affine


truth = pd.read_csv(inp.truth, sep="\t", dtype={"subject": str, "session": str})
truth = truth_in_atlas(
    truth, {s: load_transform(p) for s, p in zip(subjects, inp.transforms, strict=True)}
)
froc = params.froc
froc_table, point, candidates = tune_detector(
    load,
    subjects,
    truth,
    DetectorSettings(**params.detector),
    prior_enhancement=params.prior["enhancement"],
    prior_fraction=params.prior["fraction"],
    thresholds=threshold_grid(froc["threshold_min"], froc["threshold_max"], froc["threshold_step"]),
    max_fp_per_patient=froc["max_fp_per_patient"],
)
write_table(froc_table, snakemake.output.froc)
write_table(candidates, snakemake.output.candidates)
write_json(point, snakemake.output.operating_point)
plot_froc(froc_table, snakemake.output.figure, operating_point=point)
log.info("operating point %s", point)
