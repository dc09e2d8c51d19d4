"""edge-llm: a small on-device runtime for language-model bundles (ONNX Runtime).

The runtime depends only on onnxruntime, numpy, tokenizers and paho-mqtt (jinja2 is optional:
bundles without a plain chat format); it never imports torch, transformers or optimum (the
`export` package and extra do).
"""

__version__ = "0.1.0"
