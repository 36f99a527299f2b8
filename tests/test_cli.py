"""`coalesce ...` as a new user meets it: bad input gets one clear line, never a traceback.

Each case runs ``python -m coalesce`` in a subprocess. The processes of the table are
all started at once by a module fixture (each one is mostly interpreter start-up), and
every test waits for its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(90)

_WAIT = 60  # seconds a parse error may take, at the very most, on a loaded machine


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    says: tuple[str, ...]  # fragments stderr must contain
    status: int = 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Files the cases refer to, relative to the working directory the fixture makes.
_FILES: dict[str, bytes] = {
    "int-upstream.toml": b"upstream = 42\n",
    "latin1.toml": 'upstream = "h"\nrack = "Z\u00fcrich"\n'.encode("latin-1"),
    "nan-timeout.toml": b'upstream = "h"\nrequest_timeout = nan\n',
}

_DOWN = f"127.0.0.1:{_closed_port()}"

CASES = [
    Case("unknown-flag-shows-the-subcommands-usage", ("bench", "herd", "--frobnicate"),
         ("usage: coalesce bench herd", "unrecognized arguments: --frobnicate")),
    Case("unknown-sidecar-flag-shows-the-sidecar-usage", ("sidecar", "--upstream", "h", "--nope"),
         ("usage: coalesce sidecar", "unrecognized arguments: --nope")),
    Case("unknown-emulator-flag-shows-the-emulator-usage", ("emulator", "--nope"),
         ("usage: coalesce emulator", "--nope")),
    Case("no-subcommand-says-one-is-required", (), ("required: COMMAND",)),
    Case("bad-integer-names-the-flag", ("bench", "herd", "--callers", "lots"),
         ("argument --callers", "'lots'")),
    Case("down-cluster-names-hosts-and-the-reason",
         ("bench", "herd", "--hosts", _DOWN, "--quiet"),
         (f"--hosts {_DOWN}", "connection refused"), status=1),
    Case("json-into-a-missing-folder-fails-before-running",
         ("bench", "herd", "--target", "inprocess", "--callers", "1", "--json", "gone/r.json"),
         ("--json gone/r.json", "folder 'gone' does not exist")),
    Case("plot-into-a-missing-folder-fails-before-running",
         ("bench", "herd", "--target", "inprocess", "--callers", "1", "--plot", "gone/r.png"),
         ("--plot gone/r.png", "folder 'gone' does not exist")),
    Case("sidecars-without-the-sidecar-target-is-refused", ("bench", "herd", "--sidecars", "3"),
         ("--sidecars goes with --target sidecar",)),
    Case("one-sidecar-is-no-ring", ("bench", "herd", "--target", "sidecar", "--sidecars", "1"),
         ("--sidecars needs at least 2",)),
    Case("sidecar-target-brings-its-own-emulator",
         ("bench", "herd", "--target", "sidecar", "--hosts", _DOWN),
         ("--target sidecar starts its own emulator",)),
    Case("sidecar-target-refuses-more-channels-than-streams",
         ("bench", "herd", "--target", "sidecar", "--channels", "40000", "--quiet"),
         ("at most 32,767 channels",)),
    Case("unresolvable-listen-names-the-flag-and-the-host",
         ("sidecar", "--upstream", "h", "--advertise", "127.0.0.1:9042", "--listen", "notaport"),
         ("--listen", "cannot resolve host 'notaport'")),
    Case("missing-ca-file-is-named", ("sidecar", "--upstream", "h", "--upstream-ca", "ca.pem"),
         ("--upstream-ca", "no such file: 'ca.pem'")),
    Case("toml-upstream-of-the-wrong-type-says-what-was-expected",
         ("sidecar", "--config", "int-upstream.toml"),
         ("int-upstream.toml: upstream: expected", "got 42")),
    Case("non-utf8-toml-is-named", ("sidecar", "--config", "latin1.toml"),
         ("latin1.toml: not UTF-8 text",)),
    Case("nan-duration-is-rejected", ("sidecar", "--config", "nan-timeout.toml"),
         ("nan-timeout.toml: request_timeout: expected a finite duration",)),
    Case("missing-config-file-is-named", ("sidecar", "--config", "absent.toml"),
         ("--config absent.toml: cannot read: no such file",)),
    Case("emulator-unresolvable-listen-names-the-flag",
         ("emulator", "--listen", "nosuch.invalid:9042"),
         ("argument --listen", "cannot resolve host 'nosuch.invalid'")),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALESCE_SIDECAR_")}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])  # this checkout's coalesce
    return env


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen[str]]]:
    cwd = tmp_path_factory.mktemp("cli")
    for name, content in _FILES.items():
        (cwd / name).write_bytes(content)
    procs = {
        case.id: subprocess.Popen(
            [sys.executable, "-m", "coalesce", *case.argv], cwd=cwd, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for case in CASES
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_one_clear_error(status: int, stderr: str, *says: str) -> None:
    assert status != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, stderr
    for fragment in says:
        assert fragment in stderr


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_one_clear_line_and_a_failing_status(
    started: dict[str, subprocess.Popen[str]], case: Case,
) -> None:
    stdout, stderr = started[case.id].communicate(timeout=_WAIT)
    assert_one_clear_error(started[case.id].returncode, stderr, *case.says)
    assert started[case.id].returncode == case.status
    assert stdout == ""  # nothing ran: no benchmark table, no banner


def _python(code: str, *argv: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], cwd=cwd, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_version_comes_from_the_installed_metadata(tmp_path: Path) -> None:
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "coalesce", "--version"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=_WAIT)
    assert done.returncode == 0
    assert done.stdout.strip() == f"coalesce {version('coalesce')}"


@pytest.mark.parametrize(
    ("missing", "argv", "says"),
    [
        ("acsylla", ("bench", "herd", "--driver", "acsylla"),
         ("--driver acsylla needs acsylla", "pip install 'coalesce[acsylla]'")),
        ("cassandra", ("bench", "herd"),
         ("needs cassandra-driver or scylla-driver", "pip install 'coalesce[bench,cassandra]'")),
        ("lz4", ("bench", "herd"), ("the built-in emulator needs lz4", "'coalesce[bench]'")),
        ("lz4", ("sidecar", "--upstream", "h"),
         ("coalesce sidecar: needs lz4", "pip install 'coalesce[sidecar]'")),
        ("lz4", ("emulator",), ("coalesce emulator: needs lz4", "'coalesce[emulator]'")),
    ],
    ids=["acsylla", "driver", "emulator-for-bench", "sidecar", "emulator"],
)
def test_a_missing_extra_is_named_with_the_pip_command(
    tmp_path: Path, missing: str, argv: tuple[str, ...], says: tuple[str, ...],
) -> None:
    # None in sys.modules makes `import <missing>` fail as if it were not installed.
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from coalesce.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = _python(code, *argv, cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=_WAIT)
    assert_one_clear_error(proc.returncode, stderr, *says)
    assert stdout == ""


def test_ctrl_c_during_a_run_cancels_cleanly_with_one_line_and_status_130(
    tmp_path: Path,
) -> None:
    # The first upstream read announces itself on stdout (every caller is then running
    # and the herd's futures are all in place); then SIGINT, as Ctrl-C sends it.
    code = (
        "import sys\n"
        "from coalesce.bench.herd import HotPartition\n"
        "read = HotPartition.read\n"
        "async def announced(self, key):\n"
        "    if not getattr(self, 'announced', False):\n"
        "        self.announced = True\n"
        "        print('reading', flush=True)\n"
        "    return await read(self, key)\n"
        "HotPartition.read = announced\n"
        "from coalesce.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = _python(code, "bench", "herd", "--target", "inprocess", "--callers", "20000",
                   "--latency", "10ms",
                   "--quiet", cwd=tmp_path)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "reading\n"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=_WAIT)
    assert proc.returncode == 130
    assert stderr == "coalesce bench herd: interrupted\n"
    assert stdout == ""


def test_sidecar_logs_json_lines_from_start_to_drain(tmp_path: Path) -> None:
    # Scylla down is fine: the sidecar listens and keeps reconnecting in the background.
    proc = subprocess.Popen(
        [sys.executable, "-m", "coalesce", "sidecar", "--upstream", _DOWN, "--listen",
         "127.0.0.1:0", "--metrics", "off", "--log-format", "json"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        records = [json.loads(proc.stderr.readline())]  # every line is one JSON object
        while not records[-1]["message"].startswith("listening on 127.0.0.1:"):
            records.append(json.loads(proc.stderr.readline()))
        assert records[-1]["level"] == "INFO"
        assert records[-1]["logger"] == "coalesce.sidecar"
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=_WAIT)
        assert proc.returncode == 0
        assert "draining" in [json.loads(line)["message"] for line in rest.splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
