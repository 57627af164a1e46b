"""Built-in nodes, grouped by what they handle (image, primitives, loaders, conditioning, latent,
sampling). Each module is a plugin listed in ``ldmgraph.plugins.BUILTIN_PLUGIN_MODULES`` and
registers its node classes through the ``ldmgraph_nodes`` hook; none imports torch at module level.
"""
