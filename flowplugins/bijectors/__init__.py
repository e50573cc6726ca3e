"""Built-in bijectors, one concept per module. Each is registered in ``registry.yaml`` and as an
entry point of the group ``flowplugins.bijectors``."""
