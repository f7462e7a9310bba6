"""Fixtures: every test that takes ``backend`` runs twice, in local mode and against a live
cluster of real ``yr`` processes (a master and a node on 127.0.0.1, in a private session
directory) that this test session starts and stops. The ``yr`` binary is ``$YR_BIN``, else
``yr`` on ``PATH``, else the repository's ``target/{debug,release}/yr``."""

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

import yr

REPO = Path(__file__).resolve().parents[2]
# The node's shared memory: room for test_buffers' 1 GB array beside the other tests' objects.
# A memfd that takes pages only as objects are written, so a large figure costs nothing idle.
SHARED_MEMORY_MB = 4096


def yr_binary():
    explicit = os.environ.get("YR_BIN")
    if explicit:
        return explicit
    found = shutil.which("yr")
    if found:
        return found
    for profile in ("debug", "release"):
        candidate = REPO / "target" / profile / "yr"
        if candidate.is_file():
            return str(candidate)
    pytest.fail("no yr binary: build it (cargo build -p yr-cli) and set YR_BIN")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A master and a node started with ``yr start --master``; ``server_address`` is the
    node's bus socket."""

    def __init__(self):
        self.binary = yr_binary()
        self.session = Path(tempfile.mkdtemp(prefix="yr-pytest-"))
        os.chmod(self.session, 0o700)
        self.run("start", "--master", "--port", str(free_port()), "--node-port",
                 str(free_port()), "--session-dir", str(self.session), "--cpu", "8000",
                 "--memory", "8192", "--shared-memory-mb", str(SHARED_MEMORY_MB),
                 "--warm-pool", "2")
        self.server_address = "unix:{}".format(self.session / "bus.sock")

    def run(self, *args):
        done = subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError("yr {} failed ({}): {}{}".format(
                " ".join(args), done.returncode, done.stdout, done.stderr))
        return done.stdout

    def status(self, *args):
        """``yr status`` of this cluster, with its token."""
        token = (self.session / "token").read_text().strip()
        done = subprocess.run([self.binary, "status", *args], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, YR_TOKEN=token))
        if done.returncode != 0:
            raise RuntimeError("yr status failed ({}): {}{}".format(
                done.returncode, done.stdout, done.stderr))
        return done.stdout

    def runtime_logs(self):
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.session.rglob("runtime-*.err")))

    def stop(self):
        try:
            self.run("stop", "--force", "--session-dir", str(self.session))
        finally:
            shutil.rmtree(self.session, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster():
    started = Cluster()
    yield started
    started.stop()


@pytest.fixture(scope="session", params=["local", "cluster"])
def backend(request):
    """yr initialized in local mode, then against the live cluster; yields the mode."""
    if request.param == "local":
        yr.init(yr.Config(local_mode=True))
    else:
        live = request.getfixturevalue("cluster")
        yr.init(yr.Config(server_address=live.server_address))
    yield request.param
    yr.finalize()
