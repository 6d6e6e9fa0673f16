import json
from pathlib import Path

from _common import setup

from virtual_contrast.atlas import load_atlas
from virtual_contrast.figures import plot_subject_qc
from virtual_contrast.io import load_array, write_json

log = setup(snakemake)
subject = snakemake.wildcards.subject
provenance = {
    "subject": subject,
    "register": json.loads(Path(snakemake.input.register).read_text()),
    "skull_strip": json.loads(Path(snakemake.input.skull_strip).read_text()),
}
backends = {
    "registration": provenance["register"]["backend"],
    "skull stripping": provenance["skull_strip"]["backend"],
}
atlas = load_atlas(Path(snakemake.input.atlas[0]).parent)
plot_subject_qc(
    t1=load_array(snakemake.input.t1, subject=subject)[0],
    atlas_brain=atlas.brain_mask,
    brain_mask=load_array(snakemake.input.mask, subject=subject)[0],
    channels={
        c: load_array(p, subject=subject)[0]
        for c, p in zip(snakemake.params.channels, snakemake.input.normalized, strict=True)
    },
    subject=subject,
    backends=backends,
    path=snakemake.output.figure,
)
write_json(provenance, snakemake.output.provenance)
log.info("backends: %s", backends)
