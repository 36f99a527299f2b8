"""An application that reads through the coalesce sidecar, as docker-compose.yml runs it.

It uses its own driver (cassandra-driver or scylla-driver) exactly as it would against
Scylla: only the contact point is the sidecar. It writes one row, fires a herd of
identical concurrent reads of it, and prints what the sidecar's metrics say it merged.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from cassandra.cluster import Cluster

HOST = os.environ.get("CQL_HOST", "127.0.0.1")
PORT = int(os.environ.get("CQL_PORT", "9042"))
METRICS_URL = os.environ.get("METRICS_URL", "http://127.0.0.1:9100/metrics")
HERD = int(os.environ.get("HERD", "1000"))


def main() -> int:
    cluster = Cluster([HOST], port=PORT, protocol_version=4)
    session = cluster.connect()
    try:
        session.execute(
            "CREATE KEYSPACE IF NOT EXISTS demo WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute("CREATE TABLE IF NOT EXISTS demo.channels (id int PRIMARY KEY, topic text)")
        session.execute("INSERT INTO demo.channels (id, topic) VALUES (1, 'general')")
        select = session.prepare("SELECT topic FROM demo.channels WHERE id = ?")
        futures = [session.execute_async(select, [1]) for _ in range(HERD)]
        topics = {row.topic for future in futures for row in future.result()}
        print(f"{HERD} concurrent reads answered: {sorted(topics)}")
    finally:
        cluster.shutdown()
    with urllib.request.urlopen(METRICS_URL, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(("coalesce_callers_total", "coalesce_upstream_calls_total")):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
