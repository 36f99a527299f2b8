"""Reproduction: one client's PREPARE flood evicts another client's hot statement.

    python benchmarks/adversary_prepare.py [--cache 1000] [--seconds 10]

The sidecar runs with ``--prepared-cache`` ``--cache`` (through its environment
variable) in front of the emulator, as processes (``benchmarks/_procs.py``). A victim
executes one prepared statement about every millisecond, preparing it again whenever
the sidecar answers UNPREPARED (as drivers do); an attacker on another connection
prepares distinct statements, 50 at a time. Printed: the attacker's statements, the
victim's reads and how many UNPREPARED answers (re-prepare round trips) it got. A
cache that kept statements by use would give the victim none.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _cqlconn import CqlConn, CqlReplyError, int32, setup_keyspace

_SELECT = "SELECT v FROM adv.kv WHERE k = ?"


async def _run(cache: int, seconds: float) -> None:
    os.environ["COALESCE_SIDECAR_PREPARED_CACHE"] = str(cache)
    with _procs.emulator("0") as emu, _procs.sidecar(emu.port, False) as side:
        setup = await CqlConn.connect(emu.port)
        await setup_keyspace(setup, "adv")
        setup.close()
        victim = await CqlConn.connect(side.port)
        attacker = await CqlConn.connect(side.port)
        select = await victim.prepare(_SELECT)
        counts = {"reads": 0, "unprepared": 0}
        stop = time.monotonic() + seconds

        async def victim_loop() -> None:
            while time.monotonic() < stop:
                try:
                    await victim.execute(select, [int32(1)])
                    counts["reads"] += 1
                except CqlReplyError as exc:
                    if exc.code != 0x2500:
                        raise
                    counts["unprepared"] += 1
                    await victim.prepare(_SELECT)
                await asyncio.sleep(0.001)

        task = asyncio.create_task(victim_loop())
        prepared = 0
        while time.monotonic() < stop:
            await asyncio.gather(*(attacker.prepare(f"SELECT v FROM adv.kv WHERE k = {n}")
                                   for n in range(prepared, prepared + 50)))
            prepared += 50
        await task
        print(f"--prepared-cache {cache}: attacker prepared {prepared} distinct statements "
              f"in {seconds:g} s; victim: {counts['reads']} reads, "
              f"{counts['unprepared']} UNPREPARED answers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(_run(args.cache, args.seconds))


if __name__ == "__main__":
    main()
