"""The embedded synthetic cohort: multi-sequence brain exams with enhancing lesions, in native scanner space.

Every exam is simulated from physics rather than painted: the atlas tissue maps (GM, WM, CSF) give each point of
the head a mixture of compartments with literature relaxation times, proton densities and diffusivities at 3 T,
and the signal equations of each sequence turn them into intensities:

* T1w, low-dose and full-dose T1c: 3D spoiled gradient echo, S = PD sin a (1 - E1) / (1 - cos a E1) exp(-TE R2*).
  Gadolinium shortens T1 through R1 = R1_0 + r1 C (and T2* through r2 C). The quarter dose (0.025 mmol/kg)
  enhances less than the full dose but more than a quarter as much, because the signal saturates as R1 grows:
  the physics, not a scale factor, relates the two images.
* FLAIR: inversion recovery whose TI nulls CSF, long TE: oedema (long T2) is bright, CSF is dark.
* DWI: spin-echo EPI with b = 0 and b = 1000 s/mm2, S = S0 exp(-b ADC) per compartment (fat suppressed).

The anatomy of each patient is the atlas bent by a smooth random deformation (a few mm) and scaled (head size);
each exam places the head in the scanner with a random rigid pose (rotations up to 15 deg, translations up to
20 mm) and images it on the grids of a real protocol: near-isotropic T1 (LAS, axis-aligned), FLAIR with thick
oblique slices, DWI at twice the T1 voxel, oblique. Lesions (nodules and necrotic rings of 2-30 mm) replace
brain tissue, leak contrast agent (so they enhance), restrict diffusion, and are surrounded by vasogenic oedema.
Skull (dark), diploe and scalp fat (bright on T1) surround the brain; the sagittal sinus and the choroid plexus
carry blood and enhance a little. A smooth multiplicative bias field and Rician noise finish each image, which
is stored as int16 in scanner-like units with its qform/sform.

Determinism: an exam depends only on (seed, subject id, session, parameters): each subject draws its random
numbers from ``SeedSequence([seed, *subject id bytes, stream])``, so adding patients never changes existing
ones, and the same seed gives byte-identical files.

The package, one module per job, each depending only on those above it:

* :mod:`~virtual_contrast.cohort.physics`: tissue properties at 3 T, the contrast agent, the sequences and
  their signal equations;
* :mod:`~virtual_contrast.cohort.kinetics`: the agent's concentrations over the two-injection exam;
* :mod:`~virtual_contrast.cohort.plan`: which patients and exams the cohort has, their demographics, and the
  seeded random stream of each patient (decided from the config alone; the workflow plans with it);
* :mod:`~virtual_contrast.cohort.lesions`: an enhancing lesion (shape, kinetics, growth);
* :mod:`~virtual_contrast.cohort.anatomy`: the atlas as a head model, each patient's deformation of it and
  where the lesions lie, and the maps between subject and atlas space;
* :mod:`~virtual_contrast.cohort.acquisition`: each exam's head pose and T1 series, and the simulation of the
  images (partial volumes, signals, coarser grids, bias field, noise);
* :mod:`~virtual_contrast.cohort.exam`: one exam on disk (:func:`~virtual_contrast.cohort.exam.make_exam`,
  what the workflow's ``cohort`` rule runs), with its sidecars, true lesions and truth maps;
* :mod:`~virtual_contrast.cohort.writer`: the whole BIDS-like cohort
  (:func:`~virtual_contrast.cohort.writer.make_cohort`);
* :mod:`~virtual_contrast.cohort.commands`: ``virtual-contrast cohort``.
"""
