from _common import setup

from virtual_contrast.evaluate.figures import plot_montage
from virtual_contrast.evaluate.metrics import evaluate_subject
from virtual_contrast.io import load_array

log = setup(snakemake)
inp, subject = snakemake.input, snakemake.wildcards.subject
table = evaluate_subject(
    subject,
    candidates={"low": inp.low, "vir": inp.vir},
    ref=inp.ref,
    pre=inp.pre,
    mask=inp.mask,
    out_metrics=snakemake.output.metrics,
    out_roc=snakemake.output.roc,
)
log.info("\n%s", table.to_string())
# Montage columns: the pre-contrast T1, the study's other channels (keyed in lower case), low, vir, ref.
images = {k: load_array(inp[k], subject=subject)[0] for k in ("low", "vir", "ref")}
images |= {
    c.lower(): load_array(inp[c], subject=subject)[0] for c in snakemake.params.other_channels
}
images["t1"] = load_array(inp.pre, subject=subject)[0]
plot_montage(
    images,
    snakemake.output.montage,
    mask=load_array(inp.mask, subject=subject)[0],
    title=f"sub-{subject}",
    labels=snakemake.params.labels,
    uncertainty=load_array(inp.uncertainty, subject=subject)[0],
)
