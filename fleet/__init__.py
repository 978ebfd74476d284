"""The controller role: device and bundle registry, staged rollouts gated by health."""
