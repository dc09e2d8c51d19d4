"""The tiny fused bundle under other onnxruntime builds: same logits, same answer.

The suite's own venv has the newest onnxruntime. Older ones live in their own venvs (their
wheels replace the `onnxruntime` module): `.venvs/ort-*/bin/python` under the repo root (what
`.ci/run` creates, cached) and any interpreters listed in EDGE_LLM_ORT_PYTHONS (os.pathsep
separated). Each needs only the runtime's hard dependencies; the repo comes in via PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "ort_probe.py"
sys.path.insert(0, str(PROBE.parent))
from ort_probe import probe  # noqa: E402

from tests.conftest import run_python  # noqa: E402


def _pythons() -> list[str]:
    listed = [p for p in os.environ.get("EDGE_LLM_ORT_PYTHONS", "").split(os.pathsep) if p]
    cached = sorted(str(p) for p in ROOT.glob(".venvs/ort-*/bin/python"))
    return list(dict.fromkeys(listed + cached))


def _run(python: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(python, *args, timeout=300)


PYTHONS = _pythons()


@pytest.mark.skipif(not PYTHONS, reason="no other onnxruntime venv (.ci/run makes .venvs/ort-1.23.2)")
@pytest.mark.parametrize("python", PYTHONS)
def test_fused_bundle_same_on_other_ort(python: str, tiny_fused_int8: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe.npz"
    res = _run(python, str(PROBE), str(tiny_fused_int8), str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = np.load(out)
    import onnxruntime as ort

    assert str(theirs["ort"]) != ort.__version__, "the venv imports this suite's onnxruntime"
    ours = probe(str(tiny_fused_int8))
    for key in ("prefill", "decode", "turn"):
        # Same graph, same kernels' math: differences are float summation order at most.
        np.testing.assert_allclose(theirs[key], ours[key], atol=2e-3, err_msg=f"{key} on ORT {theirs['ort']}")
        assert (theirs[key].argmax(-1) == ours[key].argmax(-1)).all()

    # --config: the board profile goes through edge_llm.config (tomli on a Python 3.10 venv).
    args = ["-m", "edge_llm.cli", "generate", "--bundle", str(tiny_fused_int8), "--raw", "--ignore-eos"]
    args += ["--config", str(ROOT / "configs" / "boards" / "cpu-2core.toml")]
    args += ["--max-tokens", "12", "The capital of France"]
    old, new = _run(python, *args), _run(sys.executable, *args)
    assert old.returncode == 0 and new.returncode == 0, old.stderr[-2000:] + new.stderr[-2000:]
    assert old.stdout == new.stdout and old.stdout.strip()


CHOSEN = (
    "import sys; from edge_llm.engine import Engine; from edge_llm.runner import RunnerOptions; "
    "e = Engine.load(sys.argv[1], RunnerOptions(threads=1, kv_cache=sys.argv[2])); "
    "ids = e.encode_request(prompt='The capital of France'); "
    "from edge_llm.sampling import SamplingParams as P; "
    "print(e.runner.graph_name, list(e.complete(ids, P(max_tokens=8, ignore_eos=True)).token_ids))"
)


@pytest.mark.skipif(not PYTHONS, reason="no other onnxruntime venv (.ci/run makes .venvs/ort-1.23.2)")
@pytest.mark.parametrize("python", PYTHONS)
def test_bundle_with_variants_loads_on_other_ort(python: str, tiny_fused_variants: Path) -> None:
    """Older builds skip the query_seqlens graphs (requirements.graphs) and run the portable
    ones: same tokens as this build's; the int8-KV graph where that build runs it."""
    import onnxruntime as ort

    from edge_llm.bundle import version_tuple

    for kv in ("fp32", "int8"):
        old, new = (
            _run(python, "-c", CHOSEN, str(tiny_fused_variants), kv),
            _run(sys.executable, "-c", CHOSEN, str(tiny_fused_variants), kv),
        )
        assert new.returncode == 0, new.stderr[-2000:]
        old_ort = _run(python, "-c", "import onnxruntime; print(onnxruntime.__version__)").stdout.strip()
        if kv == "int8" and version_tuple(old_ort) < (1, 31, 1):
            assert old.returncode != 0 and "needs onnxruntime" in old.stderr
            continue
        assert old.returncode == 0, old.stderr[-2000:]
        graph, tokens = old.stdout.split(" ", 1)
        assert graph == ("model.onnx" if kv == "fp32" else "model.kv8.onnx")
        if version_tuple(ort.__version__) >= (1, 32):
            assert new.stdout.split(" ", 1)[0].endswith(".ragged.onnx")
        assert tokens == new.stdout.split(" ", 1)[1]


@pytest.mark.skipif(not PYTHONS, reason="no other onnxruntime venv (.ci/run makes .venvs/ort-1.23.2)")
@pytest.mark.parametrize("python", PYTHONS)
def test_padded_bundle_batches_on_other_ort(
    python: str, tiny_fused_padded: Path, tiny_fused_unpadded: Path, tmp_path: Path
) -> None:
    """The padded bundle's portable graph on an older build (no query_seqlens): the probe's two
    rows decode in one forward over their pasts, unpadded (`query_pad` 0: an always-padded graph
    made GQA refuse it, "batch_size must be 1"), with the unpadded bundle's logits bit for bit;
    so do the ragged first prompts and one row's multi-token turn (padded: S > 1 takes the
    multi-row path either way)."""
    outs = {}
    for name, bundle in (("padded", tiny_fused_padded), ("unpadded", tiny_fused_unpadded)):
        outs[name] = tmp_path / f"{name}.npz"
        res = _run(python, str(PROBE), str(bundle), str(outs[name]))
        assert res.returncode == 0, res.stderr[-2000:]
    import onnxruntime as ort

    padded, unpadded = np.load(outs["padded"]), np.load(outs["unpadded"])
    assert str(padded["ort"]) == str(unpadded["ort"]) != ort.__version__
    for key in ("prefill", "decode", "turn"):
        assert np.array_equal(padded[key], unpadded[key]), key
    can_batch = "from edge_llm.engine import Engine; from edge_llm.runner import RunnerOptions as R; "
    can_batch += "import sys; print(Engine.load(sys.argv[1], R(threads=1, max_batch=4)).can_batch)"
    res = _run(python, "-c", can_batch, str(tiny_fused_padded))
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr[-2000:]
