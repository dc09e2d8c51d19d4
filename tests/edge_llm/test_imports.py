"""The runtime stays small: importing it (and its CLI) never pulls torch, transformers or optimum."""

from __future__ import annotations

import subprocess
import sys

RUNTIME_MODULES = [
    "edge_llm",
    "edge_llm.engine",
    "edge_llm.runner",
    "edge_llm.bundle",
    "edge_llm.providers",
    "edge_llm.sampling",
    "edge_llm.tokenizer",
    "edge_llm.board",
    "edge_llm.cli",
]


def test_runtime_imports_no_heavy_packages() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {RUNTIME_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "import edge_llm.cli as c; c.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum'))\n"
        "print(bad); assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_client_sdk_loads_no_onnxruntime_or_numpy() -> None:
    """A sensor node that only sends prompts needs paho, not the runtime's inference stack."""
    code = (
        "import sys\n"
        "import edge_llm.client\n"
        "from edge_llm.client import MqttClient, AsyncMqttClient, SocketClient\n"
        "import edge_llm.client._mqtt\n"
        "conn = edge_llm.client._mqtt.MqttConnection(device='d')  # builds the paho client, no I/O\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'onnxruntime', 'tokenizers'))\n"
        "print(bad); assert not bad, bad\n"
        "assert 'paho.mqtt.client' in sys.modules  # the check would be empty if nothing had loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_one_error_tree() -> None:
    """Every deliberate error derives from `EdgeLLMError` in `edge_llm.errors`; the old import
    places still give the same classes."""
    from edge_llm import client, errors, protocol

    assert protocol.ProtocolError is errors.ProtocolError
    assert client.RequestTimeout is errors.RequestTimeout and client.ServerError is errors.ServerError
    assert issubclass(errors.ProtocolError, errors.RequestError)
    assert issubclass(errors.RequestTimeout, errors.TransportError)
    assert type(errors.error_from_reply({"code": "too_long", "message": "m"})) is errors.ContextLengthError
    unknown = errors.error_from_reply({"code": "new_code", "message": "m"})
    assert type(unknown) is errors.ServerError and unknown.code == "new_code"
