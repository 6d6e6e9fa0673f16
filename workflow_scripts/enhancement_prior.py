import numpy as np
from _common import setup

from virtual_contrast.evaluate.lesions import enhancement_map, normal_enhancement_mask
from virtual_contrast.io import load_array, save_image

log = setup(snakemake)
maps, affine = [], None
for ref, pre, mask in zip(
    snakemake.input.ref, snakemake.input.pre, snakemake.input.mask, strict=True
):
    post_a, affine = load_array(ref)
    maps.append(enhancement_map(post_a, load_array(pre)[0], load_array(mask)[0]))
mask = normal_enhancement_mask(maps, threshold=snakemake.params.threshold)
save_image(mask, affine, snakemake.output.mask, dtype=np.uint8)
log.info("normal enhancement in %d voxels (from %d training subjects)", int(mask.sum()), len(maps))
