"""Built-in nodes, grouped by what they handle (image, primitives, loaders, conditioning, latent,
sampling, ControlNet). Each module is a plugin listed as an ``ldmgraph`` entry point in
pyproject.toml and registers its node classes and conditioners through the ``ldmgraph_nodes`` and
``ldmgraph_conditioners`` hooks; none imports torch at module level.
"""
