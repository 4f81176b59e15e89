"""A small HTTP load generator, for machines without ``wrk``: an async httpx client in its own process.

``python -m bench.loadgen URL --connections 16 --seconds 10 [--header 'Authorization: Bearer …']`` keeps
``connections`` requests in flight for ``seconds`` and prints one JSON line: requests/s, p50, p99 (ms) and the
count of answers that were not 2xx. It measures less precisely than wrk (Python on the client side takes CPU
from the same two cores), which is why the suite prefers wrk and says which tool it used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx


async def load(url: str, connections: int, seconds: float, headers: dict[str, str]) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=30) as http:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await http.get(url)
                latencies.append(time.perf_counter() - started)
                if not 200 <= response.status_code < 300:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"rps": len(latencies) / elapsed, "p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000,
            "errors": errors, "requests": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    print(json.dumps(asyncio.run(load(args.url, args.connections, args.seconds, headers))))


if __name__ == "__main__":
    main()
