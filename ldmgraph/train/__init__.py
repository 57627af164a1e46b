"""Training of ldmgraph's bundled models: the method of Rombach et al. 2022, end to end.

An autoencoder is trained first (``autoencoder``), then diffusion models in its latent space:
text-to-image by cross-attention (``ldm``), super-resolution by concatenating the low-resolution
image (``superres``) and inpainting by concatenating the mask and the masked image's latent
(``inpaint``). The data set is procedural (:mod:`ldmgraph.train.data`), so nothing is downloaded.
"""
