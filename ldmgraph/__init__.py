"""ldmgraph: latent-diffusion image synthesis as JSON workflow graphs of typed nodes."""

__version__ = "0.1.0"
