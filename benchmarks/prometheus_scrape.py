"""A real Prometheus server scrapes a running `edge-llm serve --metrics`.

In: a bundle (`--bundle`; default: the newest `~/.cache/edge-llm/bundles/smollm2-int8-*`) and the
`prometheus` binary (Debian's package: `apt-get install -y prometheus`). Starts `edge-llm serve`
with a Unix socket, gRPC (when grpcio is installed) and `--metrics` on free ports; starts
Prometheus with a temporary config (scrape every second) and `--storage.tsdb.path` in a
temporary folder; sends `--requests` requests over the socket and (if available) gRPC; waits
until Prometheus has scraped a sample of `edge_llm_requests_total` that counts all of them, then
queries its HTTP API for that series and for the QPS and latency expressions the Grafana
dashboard (configs/grafana/edge-llm.json) plots.

Out: what Prometheus answered, printed and written to `benchmarks/results/prometheus_scrape.{json,md}`.

    python benchmarks/prometheus_scrape.py [--bundle DIR] [--requests 6] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mosquitto import free_port  # noqa: E402

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.client import SocketClient  # noqa: E402

P50 = "histogram_quantile(0.5, sum by (le) (rate({}_bucket[5m])))"
QUERIES = {
    "requests": "edge_llm_requests_total",
    "qps_1m": "sum(rate(edge_llm_requests_total[1m]))",
    "latency_p50_s": P50.format("edge_llm_request_duration_seconds"),
    "ttft_p50_s": P50.format("edge_llm_time_to_first_token_seconds"),
    "tokens": "edge_llm_tokens_total",
    "server_info": "edge_llm_server_info",
}


def default_bundle() -> Path | None:
    found = sorted(Path("~/.cache/edge-llm/bundles").expanduser().glob("smollm2-int8-*"))
    return found[-1] if found else None


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:g} s")


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body}")
    return body["data"]["result"]


def send_grpc(port: int, n: int, max_tokens: int) -> int:
    import grpc

    from edge_llm.proto import llm_pb2, llm_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        for _ in range(n):
            msg = llm_pb2.Message(role="user", content="What is the capital of France?")
            req = llm_pb2.ChatRequest(messages=[msg], max_tokens=max_tokens, stream=True)
            replies = list(stub.Chat(req, timeout=300))
            assert replies[-1].HasField("final")
    return n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle folder (default: the newest smollm2-int8 in the cache)")
    ap.add_argument("--requests", type=int, default=6, help="requests per transport")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/prometheus_scrape"))
    args = ap.parse_args(argv)
    bundle = Path(args.bundle) if args.bundle else default_bundle()
    if bundle is None:
        raise SystemExit("no bundle: give --bundle (no smollm2-int8-* in ~/.cache/edge-llm/bundles)")
    if not Path(args.prometheus).exists() and shutil.which(args.prometheus) is None:
        raise SystemExit("no prometheus binary: apt-get install -y prometheus (or --prometheus PATH)")
    have_grpc = importlib.util.find_spec("grpc") is not None
    tmp = Path(tempfile.mkdtemp(prefix="edge-llm-prom-"))
    metrics_port, prom_port = free_port(), free_port()
    grpc_port = free_port() if have_grpc else None
    sock = tmp / "edge.sock"
    serve_cmd = [sys.executable, "-m", "edge_llm.cli", "serve", "--bundle", str(bundle)]
    serve_cmd += ["--socket", str(sock), "--state", str(tmp / "state.sqlite")]
    serve_cmd += ["--metrics", f"127.0.0.1:{metrics_port}"]
    if grpc_port:
        serve_cmd += ["--grpc", f"127.0.0.1:{grpc_port}"]
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: edge-llm\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    prom_cmd = [
        args.prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    ]  # fmt: skip
    prom_url = f"http://127.0.0.1:{prom_port}"
    serve_log, prom_log = open(tmp / "serve.log", "w"), open(tmp / "prometheus.log", "w")  # noqa: SIM115
    serve = subprocess.Popen(serve_cmd, cwd=ROOT, stderr=serve_log)
    prom = subprocess.Popen(prom_cmd, stdout=prom_log, stderr=subprocess.STDOUT)
    version = subprocess.getoutput(f"{args.prometheus} --version").splitlines()[0]
    doc: dict[str, Any] = {"bundle": str(bundle), "prometheus": version}
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", serve, 300, "edge-llm serve")
        wait_http(f"{prom_url}/-/ready", prom, 60, "prometheus")
        t0 = time.monotonic()
        with SocketClient(str(sock), timeout=300) as client:
            for _ in range(args.requests):
                client.generate(
                    messages=[{"role": "user", "content": "What is the capital of France?"}],
                    max_tokens=args.max_tokens,
                    request_id=uuid.uuid4().hex,
                )
        sent = {"socket": args.requests}
        if grpc_port:
            sent["grpc"] = send_grpc(grpc_port, args.requests, args.max_tokens)
        doc["requests_sent"] = sent
        doc["send_s"] = round(time.monotonic() - t0, 2)
        # Wait for a scrape that has every request in it.
        total = sum(sent.values())
        end = time.monotonic() + 60
        seen = 0.0
        while time.monotonic() < end:
            seen = sum(float(r["value"][1]) for r in query(prom_url, QUERIES["requests"]))
            if seen >= total:
                break
            time.sleep(1)
        doc["scraped_requests_total"] = seen
        doc["waited_for_scrape_s"] = round(time.monotonic() - t0 - doc["send_s"], 2)
        doc["queries"] = {name: query(prom_url, expr) for name, expr in QUERIES.items()}
        # Every expression of the Grafana dashboard, as Grafana would send it for "all boards".
        dashboard = json.loads((ROOT / "configs/grafana/edge-llm.json").read_text())
        doc["dashboard"] = {}
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$instance", ".*").replace("$__rate_interval", "1m")
                result = query(prom_url, expr)
                name = f"{panel['title']} / {target['legendFormat']}"
                doc["dashboard"][name] = [r["value"][1] for r in result]
        targets = json.load(urllib.request.urlopen(f"{prom_url}/api/v1/targets", timeout=10))
        doc["target_health"] = [t["health"] for t in targets["data"]["activeTargets"]]
    finally:
        for proc in (serve, prom):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        serve_log.close()
        prom_log.close()
    md = [
        "# A real Prometheus scraping `edge-llm serve --metrics`",
        "",
        f"bundle `{bundle.name}`; {doc['prometheus']}",
        f"requests sent: {doc['requests_sent']}; target health: {doc['target_health']}",
        "",
        "| query | result |",
        "|---|---|",
    ]
    for name, result in doc["queries"].items():
        cells = "; ".join(f"{_labels(r['metric'])} = {r['value'][1]}" for r in result)
        md.append(f"| `{QUERIES[name]}` | {cells or '(empty)'} |")
    md += ["", "Grafana dashboard expressions (configs/grafana/edge-llm.json), all boards:", ""]
    md += ["| panel / series | values |", "|---|---|"]
    md += [f"| {name} | {', '.join(values) or '(no data)'} |" for name, values in doc["dashboard"].items()]
    print("\n".join(md))
    write_results(Path(args.out), doc, md)
    shutil.rmtree(tmp, ignore_errors=True)
    if doc["scraped_requests_total"] < sum(doc["requests_sent"].values()):
        raise SystemExit("Prometheus did not scrape every request within 60 s")
    return doc


def _labels(metric: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in metric.items() if k not in ("job", "instance", "__name__"))
    return f"{metric.get('__name__', '')}{{{inner}}}"


if __name__ == "__main__":
    main()
