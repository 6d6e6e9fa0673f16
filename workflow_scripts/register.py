from pathlib import Path

from _common import setup

from virtual_contrast.atlas import load_atlas
from virtual_contrast.io import write_json
from virtual_contrast.preprocess.inputs import check_exam
from virtual_contrast.preprocess.register import register_subject
from virtual_contrast.sequences import ANCHOR, key_of

log = setup(snakemake)
inp, out, params = snakemake.input, snakemake.output, snakemake.params
subject = snakemake.wildcards.subject
# Each channel registered to the T1: (image to resample, image its rigid alignment is estimated on).
others = {name: (inp[image], inp[align]) for name, (image, align) in params.alignment.items()}
# Every sequence of the exam, checked together before any registration (the DWI through its mean b0).
raw = {key_of(ANCHOR): inp[ANCHOR]} | {key_of(name): align for name, (_, align) in others.items()}
checks = check_exam(raw, subject=subject)
transforms = dict(zip(params.channels, out.transforms, strict=True))
provenance = register_subject(
    Path(inp[ANCHOR]),
    Path(inp.mask),
    {name: (Path(a), Path(b)) for name, (a, b) in others.items()},
    load_atlas(Path(inp.atlas[0]).parent),
    out_images={"T1": Path(out[ANCHOR]), **{name: Path(out[name]) for name in others}},
    out_transforms={"T1": Path(transforms[ANCHOR]), **{n: Path(transforms[n]) for n in others}},
    out_mask=Path(out.mask),
    backend=params.backend,
    subject=subject,
    align_features=params.align_features,
)
write_json({**provenance, "checks": checks}, out.provenance)
log.info("registered with %s", provenance["backend"])
