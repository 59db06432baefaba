"""The paths ``bbm.attention`` can take (its ``backend=`` argument), in a module without torch: model configs
check the name before torch is imported."""
BACKENDS = ("auto", "sdpa", "ragged", "fa4", "triton", "reference")
