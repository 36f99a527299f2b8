"""Router lookup throughput: ``node_for``, ``nodes_for`` walks and ``route`` with bounded loads.

Run: ``python benchmarks/router.py [--nodes 3] [--keys 200000] [--out router.json]``.
Prints one JSON object (operations per second per scenario) and writes it to
``--out`` if given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coalesce.router import Router


def _rate(n: int, body: Callable[[], None]) -> float:
    start = time.perf_counter()
    body()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--vnodes", type=int, default=160)
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    nodes = [f"10.0.0.{i}:9042" for i in range(1, args.nodes + 1)]
    str_keys = [f"channel-{i}" for i in range(args.keys)]
    int_keys = list(range(args.keys))
    plain = Router(nodes, vnodes=args.vnodes)
    bounded = Router(nodes, vnodes=args.vnodes, load_factor=1.25)

    def node_for_str() -> None:
        for k in str_keys:
            plain.node_for(k)

    def node_for_int() -> None:
        for k in int_keys:
            plain.node_for(k)

    def full_walk() -> None:
        for k in str_keys:
            for _ in plain.nodes_for(k):
                pass

    def route_bounded() -> None:
        for k in str_keys:
            with bounded.route(k):
                pass

    def hot_key_held() -> None:
        # One key, all requests in flight at once: the spill-over path.
        held = [bounded.acquire("hot") for _ in str_keys]
        for node in held:
            bounded.release(node)

    result = {
        "nodes": args.nodes,
        "vnodes": args.vnodes,
        "keys": args.keys,
        "python": sys.version.split()[0],
        "ops_per_s": {
            "node_for_str": round(_rate(args.keys, node_for_str)),
            "node_for_int": round(_rate(args.keys, node_for_int)),
            "nodes_for_full_walk": round(_rate(args.keys, full_walk)),
            "route_bounded_distinct_keys": round(_rate(args.keys, route_bounded)),
            "acquire_release_one_hot_key": round(_rate(args.keys, hot_key_held)),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
