import json
from pathlib import Path

from _common import setup

from virtual_contrast.io import write_json
from virtual_contrast.preprocess.options import gate_options
from virtual_contrast.preprocess.quality import gate_subject

log = setup(snakemake)
inp = snakemake.input
verdict = gate_subject(
    json.loads(Path(inp.register).read_text())["quality"],
    gate_options(snakemake.params.gate),
    subject=snakemake.wildcards.subject,
    t1_atlas=inp.t1,
    mask_atlas=inp.mask,
    atlas_brain_mask=inp.atlas_brain_mask,
    rejected_figure=Path(snakemake.params.rejected_figure),
    path=inp.register,
)
write_json(verdict, snakemake.output.verdict)
log.info("registration quality gate passed: %s", verdict["limits"])
