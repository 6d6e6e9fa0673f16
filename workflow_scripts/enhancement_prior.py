import numpy as np
from _common import setup

from virtual_contrast.evaluate.candidates import calibrated_enhancement
from virtual_contrast.evaluate.lesions import normal_enhancement_mask
from virtual_contrast.io import load_array, save_image

log = setup(snakemake)
prior, maps, affine = snakemake.params.prior, [], None
for ref, pre, mask in zip(
    snakemake.input.ref, snakemake.input.pre, snakemake.input.mask, strict=True
):
    post_a, affine = load_array(ref)
    pre_a, mask_a = load_array(pre)[0], load_array(mask)[0] > 0
    maps.append(
        calibrated_enhancement(
            post_a, pre_a, mask_a, affine, smoothing_mm=snakemake.params.smoothing_mm
        )
    )
mask = normal_enhancement_mask(maps, threshold=prior["enhancement"], fraction=prior["fraction"])
save_image(mask, affine, snakemake.output.mask, dtype=np.uint8)
log.info("normal enhancement in %d voxels (from %d training subjects)", int(mask.sum()), len(maps))
