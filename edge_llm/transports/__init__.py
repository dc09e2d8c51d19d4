"""Transports: carry protocol messages between clients and the scheduler.

Each transport turns its inbound bytes into `Dispatcher.handle` calls and sends the reply
objects it is given back over its own I/O. None of them touches the engine, and the engine and
scheduler never import a transport (paho is imported only by `edge_llm.transports.mqtt`).
"""

from edge_llm.transports.base import Address, Dispatcher

__all__ = ["Address", "Dispatcher"]
