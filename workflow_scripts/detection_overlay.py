import pandas as pd
from _common import setup

from virtual_contrast.evaluate.froc import truth_in_atlas
from virtual_contrast.evaluate.lesions import READ_MODALITIES
from virtual_contrast.evaluate.overlays import plot_detection_overlay
from virtual_contrast.io import load_array
from virtual_contrast.preprocess.transforms import load_transform

log = setup(snakemake)
inp, subject = snakemake.input, snakemake.wildcards.subject
read = [m for m in READ_MODALITIES if m in inp.keys()]
labels, affine = load_array(inp.labels, subject=subject, ndim=4)
detections = pd.read_csv(inp.detections, sep="\t", dtype={"subject": str})
truth = None
if "truth" in inp.keys():
    truth = pd.read_csv(inp.truth, sep="\t", dtype={"subject": str, "session": str})
    truth = truth_in_atlas(truth, {subject: load_transform(inp.transform)})
plot_detection_overlay(
    {m: load_array(inp[m], subject=subject)[0] for m in read},
    {m: labels[..., READ_MODALITIES.index(m)] for m in read},
    {m: detections[detections["modality"] == m] for m in read},
    affine,
    snakemake.output.figure,
    truth=truth,
    title=f"sub-{subject}: automated reader",
    titles=snakemake.params.labels,
    uncertainty=load_array(inp.uncertainty, subject=subject)[0],
)
