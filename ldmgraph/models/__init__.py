"""Torch models of latent diffusion: U-Net, KL autoencoder, text encoders, checkpoint loading, model cache.

Import the submodules directly (`ldmgraph.models.text_encoders`, `ldmgraph.models.checkpoint`, ...);
this package file stays light so that importing one model does not pull in the others.
"""
