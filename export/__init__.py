"""The workstation export pipeline: load → prune → distill → to_onnx → quantize → evaluate → bundle.

Each stage is one flat module with a frozen config dataclass and a pure `run(...)`; `recipe.py`
chains them and caches each stage's output so a changed later stage does not redo earlier ones.
Needs the `export` extra (torch, transformers, optimum-onnx); the runtime never imports this.
"""
