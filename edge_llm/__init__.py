"""edge-llm: a small on-device runtime for language-model bundles (ONNX Runtime).

The runtime depends only on onnxruntime, numpy, tokenizers and paho-mqtt (jinja2 is optional:
bundles without a plain chat format); it never imports torch, transformers or optimum (the
`export` package and extra do).
"""

import os

# onnxruntime records a telemetry event (a persistent device id, the CPU, the executable path)
# for every process unless ORT_DISABLE_TELEMETRY is set before it is imported;
# `disable_telemetry_events()` does not stop it. Every runtime module (and the CLI) imports this
# package first, so ORT is always imported after this line. A user's own setting is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Bumped when a bundle may need this runtime (bundle.json `requirements.edge_llm`): 0.2.0 reads
# `graph.kv_spare`; 0.3.0 feeds the padded graph's `query_pad` switch and runs an eagle1 draft.
# pyproject.toml's version follows it (tests/test_packaging.py).
__version__ = "0.3.0"
