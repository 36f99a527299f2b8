"""The Grafana dashboard in deploy/grafana only uses metrics the sidecar and groups export."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from .conftest import LoopStack
from .cqlclient import RawClient

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "coalesce-dashboard.json"
KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)


def _metric_names(dashboard: dict[str, Any]) -> set[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bcoalesce_[a-z0-9_]+", expr)}


async def test_every_metric_the_dashboard_queries_is_exported(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack()
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await client.query(KEYSPACE)
    await client.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await client.query("SELECT * FROM ks.kv WHERE k = 1")  # merged
    await client.query("INSERT INTO ks.kv (k, v) VALUES (1, 'x')")  # forwarded
    await client.query("USE ks")  # local
    await client.close()

    text = generate_latest(stack.sidecar.registry).decode()
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    names = _metric_names(json.loads(DASHBOARD.read_text()))
    assert len(names) >= 10
    assert names <= samples, sorted(names - samples)
