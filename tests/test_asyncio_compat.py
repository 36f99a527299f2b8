"""The private asyncio API lives in one module, is checked at import, and has a fallback."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import coalesce
from coalesce import SingleFlight, _asyncio_compat
from tests.conftest import Backend, settle

PRIVATE = re.compile(
    r"_enter_task|_leave_task|_swap_current_task|_log_destroy_pending|_asyncio_future_blocking"
    r"|asyncio\.(tasks|futures|events|base_events)\._"
)
# Files that still use private asyncio API outside the compat module, each with why.
ALLOWED = {
    "_asyncio_compat.py",
}


def test_self_test_accepts_this_python():
    assert _asyncio_compat._self_test() is None
    assert _asyncio_compat.INLINE_FIRST_STEP is (
        os.environ.get(_asyncio_compat.FORCE_FALLBACK_ENV, "") in ("", "0")
    )


async def test_self_test_runs_when_imported_from_inside_a_running_loop():
    assert _asyncio_compat._self_test() is None


def test_self_test_refuses_a_swap_that_current_task_does_not_follow(monkeypatch):
    monkeypatch.setattr(_asyncio_compat, "_enter", lambda loop, task: None)
    monkeypatch.setattr(_asyncio_compat, "_leave", lambda loop, task: None)
    assert "current_task() did not follow" in (_asyncio_compat._self_test() or "")


def test_self_test_refuses_a_swap_that_fails_halfway(monkeypatch):
    monkeypatch.setattr(_asyncio_compat, "_enter", lambda loop, task: None)
    assert _asyncio_compat._self_test() is not None


def test_self_test_refuses_a_python_without_the_private_functions(monkeypatch):
    monkeypatch.setattr(_asyncio_compat, "_leave", None)
    assert "_leave_task" in (_asyncio_compat._self_test() or "")


def test_self_test_turns_any_surprise_into_a_reason(monkeypatch):
    def broken(loop: Any, task: Any) -> None:
        raise RuntimeError("changed in a later CPython")

    monkeypatch.setattr(_asyncio_compat, "_leave", broken)
    assert "changed in a later CPython" in (_asyncio_compat._self_test() or "")


def test_environment_variable_forces_the_plain_task_fallback():
    env = {**os.environ, _asyncio_compat.FORCE_FALLBACK_ENV: "1"}
    probe = "import coalesce._asyncio_compat as c; print(c.INLINE_FIRST_STEP, c.FALLBACK_REASON)"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("False") and _asyncio_compat.FORCE_FALLBACK_ENV in out


async def test_fallback_shares_calls_without_touching_private_asyncio(monkeypatch):
    def forbidden(*_: Any) -> None:
        raise AssertionError("the fallback used private asyncio API")

    monkeypatch.setattr(_asyncio_compat, "INLINE_FIRST_STEP", False)
    monkeypatch.setattr(_asyncio_compat, "_enter", forbidden)
    monkeypatch.setattr(_asyncio_compat, "_leave", forbidden)
    monkeypatch.setattr(_asyncio_compat, "enter_task", forbidden)
    monkeypatch.setattr(_asyncio_compat, "leave_task", forbidden)
    monkeypatch.setattr(_asyncio_compat, "quiet_when_destroyed", forbidden)
    group: SingleFlight[Any] = SingleFlight(metrics=False)
    backend = Backend()
    callers = [asyncio.create_task(group.do("k", backend, "v")) for _ in range(20)]
    await settle()
    callers[0].cancel()  # the first caller leaving keeps the call for the others
    await settle()
    backend.release()
    assert await asyncio.gather(*callers[1:]) == ["v"] * 19
    assert backend.calls == 1 and len(group) == 0 and group.running == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "coalesce-flight"]


def test_only_the_compat_module_uses_private_asyncio_api():
    root = Path(coalesce.__file__).parent
    users = {
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if PRIVATE.search(path.read_text(encoding="utf-8"))
    }
    assert users <= ALLOWED, f"private asyncio API outside _asyncio_compat: {users - ALLOWED}"
