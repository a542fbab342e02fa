"""Throughput of the auto-interp LLM-call layer against the local fake server (tests/llm_server.py)
with a fixed latency: achieved requests/s over the ideal C / latency of C requests in flight.

    python bench/autointerp.py                          # C = 64, latency 100 ms, N = 2000
    python bench/autointerp.py --concurrency 16 --latency 0.05 --requests 1000 --no-cache
    python bench/autointerp.py --actors 2 --requests 6000   # through the Ray actor pool

The server runs in its own process (both modes), as a real one would (its HTTP parsing would
otherwise share this process's GIL with the client); --in-process runs it in a thread here.
The ratio is bounded by the client's CPU per request (printed): one process sends at most
1 / (CPU per request) requests/s, whatever C is; past that, more actors, not more in flight.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt_ray.autointerp.llm import LLMClient, LLMRequest, ResultCache, request_key
from clt_ray.config import LLMConfig
from tests.llm_server import FakeLLMServer, echo


def explanation_reply(messages: list[dict]) -> str:
    """A reply the pipeline's explanation parser accepts."""
    return "Explanation: " + messages[-1]["content"][:40]


def serve(conn, latency_s: float, explain: bool = False) -> None:
    """The fake server in this (spawned) process; sends its URL, then, when told the bench is
    done, the arrival times of the requests it got."""
    with FakeLLMServer(explanation_reply if explain else echo, latency_s=latency_s) as server:
        conn.send(server.url)
        conn.recv()
        conn.send(sorted(e.t for e in server.entries()))


def start_server(latency_s: float, explain: bool = False):
    """(url, stop() -> arrival times) of a fake server in its own process."""
    here, there = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=serve, args=(there, latency_s, explain),
                                           daemon=True)
    proc.start()
    url = here.recv()

    def stop() -> list[float]:
        here.send(None)
        times = here.recv()
        proc.join(10)
        return times

    return url, stop


def parse(raw: str) -> str:
    if not raw.startswith("echo: "):
        raise ValueError(raw[:40])
    return raw[6:]


def requests(n: int, model: str, tag: str) -> list[LLMRequest]:
    out = []
    for i in range(n):
        messages = [
            {"role": "system", "content": "Explain the feature in one short phrase."},
            {"role": "user", "content": f"{tag} feature {i}: examples <<the>> cat sat on <<the>>"},
        ]
        out.append(LLMRequest(request_key(f"{tag}/{i}", messages, model), messages))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.1, help="server latency, seconds")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--no-cache", action="store_true", help="skip the result cache writes")
    ap.add_argument("--in-process", action="store_true", help="serve from a thread here")
    ap.add_argument("--actors", type=int, default=0,
                    help="send through the Ray actor pool (actors.autointerp.call_on_ray) with "
                         "this many actors, C split between them")
    args = ap.parse_args()
    c, lat, n = args.concurrency, args.latency, args.requests
    if args.actors:
        return on_ray(args)

    if args.in_process:
        server = FakeLLMServer(latency_s=lat).start()
        url, stop = server.url, server.stop
    else:
        url, stop = start_server(lat)

    config = LLMConfig(base_url=url, model="fake", concurrency=c)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = None if args.no_cache else ResultCache(tmp)
            LLMClient(config, cache).run_sync(requests(min(n, 2 * c), "fake", "warm"), parse)
            client = LLMClient(config, cache)
            cpu0, t0 = time.process_time(), time.perf_counter()
            results = client.run_sync(requests(n, "fake", "bench"), parse)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            if cache is not None:
                cache.close()
    finally:
        stop()

    ok = sum(r.ok for r in results)
    rate, ideal = n / wall, c / lat
    print(
        f"auto-interp LLM calls: N={n}, C={c}, latency {lat * 1e3:.0f} ms, "
        f"server {'in this process' if args.in_process else 'in its own process'}, "
        f"cache {'off' if args.no_cache else 'on'}"
    )
    print(f"  {ok}/{n} ok in {wall:.2f} s; client CPU {cpu / n * 1e3:.2f} ms per request")
    print(f"  achieved {rate:.0f} req/s, ideal C/latency {ideal:.0f} req/s")
    print(f"  ratio {rate / ideal:.2f} (goal >= 0.8)")


def on_ray(args) -> None:
    """The production path: Ray Data actors with async clients. The rate is measured at the
    server, from the first request's arrival to the last one's (actor start-up excluded)."""
    import ray
    from clt_ray.actors.autointerp import call_on_ray

    c, lat, n = args.concurrency, args.latency, args.requests
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    url, stop = start_server(lat, explain=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = LLMConfig(base_url=url, model="fake", concurrency=c)
            items = [{"key": r.key, "messages": r.messages, "parser": "explanation"}
                     for r in requests(n, "fake", "ray")]
            results = call_on_ray(items, config, tmp, actors=args.actors, cpus_per_actor=0.25)
    finally:
        times = stop()
    ok = sum(r.ok for r in results)
    rate, ideal = (len(times) - 1) / (times[-1] - times[0]), c / lat
    print(f"auto-interp LLM calls on Ray: N={n}, C={c} over {args.actors} actors, latency "
          f"{lat * 1e3:.0f} ms, server in its own process, cache on")
    print(f"  {ok}/{n} ok; achieved {rate:.0f} req/s at the server, ideal C/latency "
          f"{ideal:.0f} req/s")
    print(f"  ratio {rate / ideal:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
