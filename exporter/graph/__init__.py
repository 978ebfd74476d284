"""The decoder graph builder shared by the native LM pipeline and the GGUF import.

    decoder.py   DecoderConfig + DecoderWeights -> the decoder-with-past ONNX graph (onnx.helper),
                 GroupQueryAttention or plain attention, external data written as it is built
"""
