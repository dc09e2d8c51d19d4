"""Subcommands of the `edge-llm` CLI, one module each (see `edge_llm.cli`)."""
