from pathlib import Path

from _common import setup

from virtual_contrast.atlas import load_atlas
from virtual_contrast.io import write_json
from virtual_contrast.preprocess.inputs import check_exam
from virtual_contrast.preprocess.register import register_subject

log = setup(snakemake)
inp, out = snakemake.input, snakemake.output
subject = snakemake.wildcards.subject
# Every sequence of the exam, checked together before any registration (the DWI through its mean b0).
raw = {"t1": inp.T1w, "flair": inp.FLAIR, "low": inp.lowT1c, "ref": inp.refT1c, "dwi": inp.b0}
checks = check_exam(raw, subject=subject)
# Each channel: (image to resample, image its rigid alignment to the T1 is estimated on).
others = {
    "FLAIR": (inp.FLAIR, inp.FLAIR),
    "ADC": (inp.ADC, inp.b0),
    "lowT1c": (inp.lowT1c, inp.lowT1c),
    "refT1c": (inp.refT1c, inp.refT1c),
}
transforms = dict(zip(snakemake.params.channels, out.transforms, strict=True))
provenance = register_subject(
    Path(inp.T1w),
    Path(inp.mask),
    {name: (Path(a), Path(b)) for name, (a, b) in others.items()},
    load_atlas(Path(inp.atlas[0]).parent),
    out_images={"T1": Path(out.T1w), **{name: Path(out[name]) for name in others}},
    out_transforms={"T1": Path(transforms["T1w"]), **{n: Path(transforms[n]) for n in others}},
    out_mask=Path(out.mask),
    backend=snakemake.params.backend,
    subject=subject,
)
write_json({**provenance, "checks": checks}, out.provenance)
log.info("registered with %s", provenance["backend"])
