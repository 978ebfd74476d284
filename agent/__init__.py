"""The on-device agent, and the two contracts every role shares.

`agent.bundle` (what a bundle is) and `agent.protocol` (what crosses MQTT) live here because the
agent is the smallest install: the exporter and the controller import them from here, and nothing
in them may import torch or transformers.
"""
