"""``yr.Config``'s environment fields: ``runtime_env``, ``env_file`` and ``auth_token``. Each
program runs in its own interpreter, since ``yr.init`` takes a ``Config`` once per process."""

import os
import subprocess
import sys
import textwrap

import pytest

import yr
from yr.exception import YRValueError


def run_program(source, **env):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(source)],
                          capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, **env))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_unsupported_runtime_env_keys_and_bad_values_are_1001():
    with pytest.raises(YRValueError, match="does not support runtime_env\\['pip'\\]") as caught:
        yr.Config(runtime_env={"pip": ["numpy"]})
    assert caught.value.code == 1001
    with pytest.raises(YRValueError):
        yr.Config(runtime_env={"env_vars": {"A": 1}})
    with pytest.raises(YRValueError):
        yr.Config(runtime_env={"working_dir": 3})
    assert yr.Config(custom_envs={"A": "1", "B": "1"},
                     runtime_env={"env_vars": {"B": "2"}}).runtime_envs() == {"A": "1", "B": "2"}


def test_an_env_file_is_loaded_at_init_and_a_bad_one_is_1001(tmp_path):
    good = tmp_path / "good.env"
    good.write_text("# settings\nexport YR_PY_ENV_A=one\nYR_PY_ENV_B = 'two words'\n\n")
    out = run_program(f"""
        import os, yr
        yr.init(yr.Config(local_mode=True, env_file={str(good)!r}))
        print(os.environ["YR_PY_ENV_A"], os.environ["YR_PY_ENV_B"], sep="|")
        yr.finalize()
    """)
    assert out.strip() == "one|two words"
    bad = tmp_path / "bad.env"
    bad.write_text("NOT A LINE\n")
    out = run_program(f"""
        import yr
        for path in ({str(bad)!r}, {str(tmp_path / "missing.env")!r}):
            try:
                yr.init(yr.Config(local_mode=True, env_file=path))
            except yr.exception.YRValueError as error:
                print(error.code, yr.is_initialized())
    """)
    assert out.split() == ["1001", "False", "1001", "False"]


def test_runtime_env_reaches_the_runtimes_and_auth_token_is_the_token(cluster):
    token = (cluster.session / "token").read_text().strip()
    work = cluster.session.parent
    out = run_program(f"""
        import os, yr

        @yr.invoke
        def where():
            return os.environ.get("PY_RT_ENV_OF_YR"), os.environ.get("PY_CUSTOM_OF_YR"), os.getcwd()

        yr.init(yr.Config(server_address={cluster.server_address!r}, auth_token={token!r},
                          custom_envs={{"PY_CUSTOM_OF_YR": "custom"}},
                          runtime_env={{"env_vars": {{"PY_RT_ENV_OF_YR": "from-runtime-env"}},
                                        "working_dir": {str(work)!r}}}))
        print(*yr.get(where.invoke(), timeout=60), sep="|")
        yr.finalize()
    """)
    assert out.strip() == "from-runtime-env|custom|" + str(work)
    # A wrong token is the one presented (the session's token file is not used): 1014.
    wrong = "0" * len(token)
    out = run_program(f"""
        import yr
        try:
            yr.init(yr.Config(server_address={cluster.server_address!r}, auth_token={wrong!r}))
        except yr.exception.YRError as error:
            print(error.code)
    """)
    assert out.strip() == "1014"
