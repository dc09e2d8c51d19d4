"""Which HTTP server library for a board: the memory each candidate adds to a Python process.

In: a Python interpreter that has the candidates installed (`--python`, default this one; the
run in docs used a scratch venv with aiohttp, hypercorn, uvicorn and starlette). For each
candidate, a fresh interpreter imports it and builds a one-route app (no socket opened), and
reports VmRSS before and after, and the number of modules it loaded. Candidates missing from
that interpreter are reported as such.

    python benchmarks/http_libs.py [--python /path/to/python] [--runs 3]

Out: printed as a Markdown table (median of `--runs`). Import cost is what a board pays once
per process; the serving cost under load is `benchmarks/http_overhead.py`'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CANDIDATES = {
    "uvicorn (h11) + starlette": (
        "import uvicorn, uvicorn.protocols.http.h11_impl\n"
        "from starlette.applications import Starlette\n"
        "from starlette.routing import Route\n"
        "from starlette.responses import JSONResponse\n"
        "async def h(r): return JSONResponse({})\n"
        "app = Starlette(routes=[Route('/', h)])\n"
        "uvicorn.Config(app, http='h11', loop='asyncio', ws='none', lifespan='off').load()\n"
    ),
    "uvicorn (h11), raw ASGI": (
        "import uvicorn, uvicorn.protocols.http.h11_impl\n"
        "async def app(scope, receive, send): pass\n"
        "uvicorn.Config(app, http='h11', loop='asyncio', ws='none', lifespan='off').load()\n"
    ),
    "aiohttp": (
        "from aiohttp import web\n"
        "async def h(r): return web.json_response({})\n"
        "app = web.Application(); app.router.add_get('/', h)\n"
    ),
    "hypercorn + starlette": (
        "import hypercorn.asyncio, hypercorn.config\n"
        "from starlette.applications import Starlette\n"
        "from starlette.routing import Route\n"
        "from starlette.responses import JSONResponse\n"
        "async def h(r): return JSONResponse({})\n"
        "app = Starlette(routes=[Route('/', h)]); hypercorn.config.Config()\n"
    ),
}

PROBE = """
import sys, json
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
import asyncio, json as _j, ssl, logging  # what the runtime has loaded anyway
before, mods = rss(), len(sys.modules)
try:
    exec(sys.argv[1])
except ImportError as exc:
    print(json.dumps({"missing": str(exc)})); raise SystemExit
print(json.dumps({"added_mib": rss() - before, "modules": len(sys.modules) - mods}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print("| library | RSS added MiB (median) | modules loaded |")
    print("|---|---|---|")
    for name, code in CANDIDATES.items():
        results = []
        for _ in range(args.runs):
            out = subprocess.run([args.python, "-c", PROBE, code], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout))
        if "missing" in results[0]:
            print(f"| {name} | not installed ({results[0]['missing']}) | |")
            continue
        rss = statistics.median(r["added_mib"] for r in results)
        print(f"| {name} | {rss:.1f} | {results[0]['modules']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
