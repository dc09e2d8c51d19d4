"""Reading a server's Prometheus text in tests (as a scraper would, with prometheus-client's parser)."""

from __future__ import annotations


def requests_total(text: str) -> dict[tuple[str, str], float]:
    """edge_llm_requests_total by (transport, outcome)."""
    from prometheus_client.parser import text_string_to_metric_families

    family = next(f for f in text_string_to_metric_families(text) if f.name == "edge_llm_requests")
    totals = [s for s in family.samples if s.name.endswith("_total")]
    return {(s.labels["transport"], s.labels["outcome"]): s.value for s in totals}
