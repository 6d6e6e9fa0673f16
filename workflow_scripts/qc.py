import json
from pathlib import Path

from _common import setup

from virtual_contrast.atlas import load_atlas
from virtual_contrast.figures import gate_text, plot_subject_qc
from virtual_contrast.io import load_array, write_json
from virtual_contrast.preprocess.options import brain_extraction_label

log = setup(snakemake)
subject = snakemake.wildcards.subject
inp = snakemake.input
register = json.loads(Path(inp.register).read_text())
register["gate"] = json.loads(Path(inp.gate).read_text())
skull_strip = json.loads(Path(inp.skull_strip).read_text())
provenance = {
    "subject": subject,
    "preprocess_options": snakemake.params.options,
    "backends": snakemake.params.backends,
    "skull_strip": skull_strip,
    "register": register,
    # Which low-dose T1c the subject has: the acquired series, or one simulated (and how).
    "low_dose": (
        {"simulated": True, **json.loads(Path(inp.low_dose).read_text())}
        if "low_dose" in inp.keys()
        else {"simulated": False}
    ),
}
backends = {
    "brain extraction": brain_extraction_label(skull_strip),
    "registration": register["backend"],
}
if "low_dose" in inp.keys():
    backends["low-dose T1c"] = "simulated"
t1_native, native_affine = load_array(inp.t1_native, subject=subject)
plot_subject_qc(
    t1_native=t1_native,
    native_affine=native_affine,
    native_mask=load_array(inp.native_mask, subject=subject)[0],
    t1=load_array(inp.t1, subject=subject)[0],
    atlas_brain=load_atlas(Path(inp.atlas[0]).parent).brain_mask,
    brain_mask=load_array(inp.mask, subject=subject)[0],
    channels={
        c: load_array(p, subject=subject)[0]
        for c, p in zip(snakemake.params.channels, inp.normalized, strict=True)
    },
    subject=subject,
    backends=backends,
    gate=gate_text(register["quality"], register["gate"]),
    path=snakemake.output.figure,
)
write_json(provenance, snakemake.output.provenance)
log.info("backends: %s", backends)
