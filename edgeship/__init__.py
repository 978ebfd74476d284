"""edgeship: Hugging Face model -> signed ONNX bundle -> fleet of edge devices.

This package holds only the version and the `edgeship` command's dispatcher. The three roles are
the top-level packages `exporter` (workstation), `agent` (device) and `fleet` (controller).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeship")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
