"""What only a cluster shows: Python runtimes are separate processes of the driver's
interpreter, and code they cannot import is 2001 naming the module."""

import os
import shutil
import sys
import tempfile

import pytest

import yr
from yr.exception import YRError


@yr.invoke
def runtime_facts():
    return os.getpid(), sys.executable, os.getcwd()


def test_runtimes_run_the_drivers_interpreter_and_directory(backend):
    if backend != "cluster":
        pytest.skip("runtimes exist only on a cluster")
    pid, executable, cwd = yr.get(runtime_facts.invoke(), timeout=60)
    assert pid != os.getpid()
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    assert cwd == os.getcwd()


def test_a_module_the_runtime_cannot_import_is_2001_naming_it(backend):
    if backend != "cluster":
        pytest.skip("in local mode the module is already imported")
    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "yr_vanished_module.py"), "w") as source:
        source.write("def answer():\n    return 42\n")
    sys.path.insert(0, directory)
    try:
        import yr_vanished_module
    finally:
        sys.path.remove(directory)
        shutil.rmtree(directory)
    # Not decorated in its module: pickled by reference, so the runtime must import it.
    remote = yr.invoke(yr_vanished_module.answer)
    with pytest.raises(YRError) as caught:
        yr.get(remote.invoke(), timeout=60)
    assert caught.value.code == 2001
    assert "yr_vanished_module" in str(caught.value)


@yr.instance
class EnvironmentReader:
    def read(self, name):
        return os.environ.get(name)


def test_env_vars_reach_the_runtime(backend):
    if backend != "cluster":
        pytest.skip("local mode runs in the driver's environment")
    reader = EnvironmentReader.options(env_vars={"PY_TEST_ENV_OF_YR": "from-options"}).invoke()
    assert yr.get(reader.read.invoke("PY_TEST_ENV_OF_YR"), timeout=60) == "from-options"
    reader.terminate()
