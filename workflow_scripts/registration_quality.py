import json
from pathlib import Path

import pandas as pd
from _common import setup

from virtual_contrast.io import write_table
from virtual_contrast.preprocess.options import gate_options
from virtual_contrast.preprocess.quality import quality_row

log = setup(snakemake)
gate = gate_options(snakemake.params.gate)
rows = [
    quality_row(subject, json.loads(Path(path).read_text()), gate)
    for subject, path in zip(snakemake.params.subjects, snakemake.input, strict=True)
]
write_table(pd.DataFrame(rows), snakemake.output.table)
log.info(
    "registration quality of %d subjects, %d rejected by the gate",
    len(rows),
    sum(not row["passed"] for row in rows),
)
