"""Code behind one notebook family each: what a figure needs beyond the library (problem grids, tables, claims,
figure layouts). Notebooks import from here; the core (``jpmap_core.*`` outside this package) never does.

* :mod:`~jpmap_core.experiments.landscape` -- JPMAP Figs. 3-4 (notebooks 02, 03): posterior slices, multistart descents
* :mod:`~jpmap_core.experiments.continuation` -- JPMAP Fig. 5 and the Alg. 2.2 diagnostic (notebook 04)
* :mod:`~jpmap_core.experiments.sigma_sweep` -- JPMAP Figs. 1-2 (notebook 05): the sigma_DVAE sweep
* :mod:`~jpmap_core.experiments.mnist_benchmark` -- JPMAP Figs. 6-7 (notebook 06): 3 problems x 5 levels x 5 methods
* :mod:`~jpmap_core.experiments.faces` -- JPMAP Fig. 8 (notebook 07): CelebA and FFHQ faces
* :mod:`~jpmap_core.experiments.posterior` -- VBLE and VBLE-xz against JPMAP (notebook 12): posterior samples,
  uncertainty maps, calibration
* :mod:`~jpmap_core.experiments.pnp_hvae_analysis` -- PnP-HVAE Figs. 1, 2, 7 (notebooks 08, 09): Lipschitz ratios and
  Jacobian norms of the HVAE reconstruction, Algorithm 2 against Adam, the temperature sweep
* :mod:`~jpmap_core.experiments.pnp_hvae_faces` -- PnP-HVAE Table 1 and Fig. 3 (notebook 10): face super-resolution,
  deblurring and inpainting by PnP-HVAE, Adam on J1, JPMAP and CSGM
* :mod:`~jpmap_core.experiments.aipo` -- AIPO Tables 1-3 and Figs. 1-4 (notebook 13): AIPO against its three
  equal-budget baselines with flow priors; Algorithm 2 on CSGM's latent problem for a VAE
* :mod:`~jpmap_core.experiments.natural` -- PnP-HVAE Tables 2-4 and Figs. 5-6 (notebook 11): BSD deblurring and
  inpainting by PnP-HVAE, EPLL, TV and Wiener on the same problems, the effect of the number of latent groups
"""
