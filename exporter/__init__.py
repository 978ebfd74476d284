"""The workstation role: Hugging Face model (or GGUF) -> optimized, quantized, validated, signed bundle."""
