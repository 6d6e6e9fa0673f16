import pandas as pd
from _common import setup

from virtual_contrast.io import write_table, write_text
from virtual_contrast.reader.demographics import demographics_markdown, demographics_table

log = setup(snakemake)
table = demographics_table(pd.DataFrame(snakemake.params.subjects), group_column="split")
if table is None:
    log.info("the subjects table has no age, sex, weight or indication column: no Table 1")
    table = pd.DataFrame(columns=["variable", "level", "p_value", "statistical_test"])
    write_text(
        "No demographic columns (age, sex, weight, indication) in the subjects table.\n",
        snakemake.output.markdown,
    )
else:
    write_text(demographics_markdown(table), snakemake.output.markdown)
write_table(table, snakemake.output.table)
