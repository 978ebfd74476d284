"""GGUF import: a llama.cpp checkpoint -> LM-bundle ONNX model with its quantized blocks kept exactly.

    reader.py   GgufFile: metadata and tensors (gguf package), per-type report of what was kept
    repack.py   GGUF blocks -> MatMulNBits codes/scales/zero points/offsets (pure numpy, bit-exact)
    arch.py     llama / qwen2 / qwen3 / phi3 / gemma / gemma2 / phi2 / gptneox -> DecoderConfig + DecoderWeights
    (the decoder graph itself is built by exporter/graph/decoder.py, shared with the native LM pipeline)
    levels.py   AccuracyPolicy: the MatMulNBits accuracy level of each weight class, measured (lm_head top-k exact)
    export.py   export_gguf(path, out_dir) -> GgufResult (onnx_path, files, model_spec, quantization)
    tokenizer.py  the tokenizer from the tokenizer.* metadata (transformers' converters)
    reference.py  the float32 transformers model of the file: transformers' GGUF loader where it reads the
                file right, else the config from arch.py's metadata and the tensors mapped back strictly
    quality.py  gguf_quality(): perplexity / top-1 / greedy chat answer vs that fp32 model

Errors are the exporter's (exporter/errors.py): SourceError for unreadable files and tokenizers,
UnsupportedArchitecture naming the supported ones, ConversionError when the graph cannot be built.
"""
