"""``yr.Config``'s environment fields: ``runtime_env``, ``env_file`` and ``auth_token``. Each
program runs in its own interpreter, since ``yr.init`` takes a ``Config`` once per process."""

import json
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


def test_fields_without_a_counterpart_warn_and_wiring_fields_are_1001():
    with pytest.raises(YRValueError, match="function_id is not supported: yr names functions") \
            as caught:
        yr.Config(function_id="sn:cn:yrk:12345678901234561234567890123456:function:0-x:$latest")
    assert caught.value.code == 1001
    with pytest.raises(YRValueError, match="log_to_driver=True is not supported"):
        yr.Config(log_to_driver=True)
    with pytest.raises(YRValueError, match="connection_nums must be int"):
        yr.Config(connection_nums="many")
    with pytest.raises(YRValueError, match="enable_tls needs certificate_file_path"):
        yr.Config(enable_tls=True, verify_file_path="ca.pem")._core_fields()
    with pytest.raises(YRValueError, match="deployment_config takes effect with auto=True"):
        yr.Config(deployment_config=yr.DeploymentConfig(cpu=1000))._core_fields()
    with pytest.raises(YRValueError, match="DeploymentConfig.mem must be an int >= 0"):
        yr.DeploymentConfig(mem=-1)
    out = run_program("""
        import warnings, yr
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yr.init(yr.Config(local_mode=True, connection_nums=100, log_to_driver=False,
                              invoke_timeout=900))
        print(sorted(str(w.message).split(":")[0] for w in caught))
        yr.finalize()
    """)
    assert out.strip() == str(["yr.Config.connection_nums has no effect in yr",
                               "yr.Config.invoke_timeout has no effect in yr"])


def test_load_paths_come_first_on_the_import_path_of_runtimes_and_local_mode(cluster, tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    (library / "yr_py_loaded_module.py").write_text("WHERE = 'from load_paths'\n")
    for conf in ("local_mode=True", f"server_address={cluster.server_address!r}"):
        out = run_program(f"""
            import yr

            @yr.invoke
            def where():
                import yr_py_loaded_module
                return yr_py_loaded_module.WHERE

            yr.init(yr.Config({conf}, load_paths=[{str(library)!r}]))
            print(yr.get(where.invoke(), timeout=60))
            yr.finalize()
        """)
        assert out.strip() == "from load_paths", conf


def test_auto_starts_a_cluster_of_the_drivers_own_with_its_resources_and_finalize_stops_it():
    done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import json, os, subprocess, sys, yr

        @yr.invoke
        def double(x):
            return 2 * x

        yr.init(yr.Config(auto=True,
                          deployment_config=yr.DeploymentConfig(cpu=3000, mem=3072)))
        # 3,000 millicores fit only on the node the deployment asked for (the default has 2,000).
        print(yr.get(double.options(yr.InvokeOptions(cpu=3000)).invoke(21), timeout=60))
        yr.finalize()
    """)], capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "42"
    started = [line for line in done.stderr.splitlines()
               if line.startswith("Starting a cluster for this driver in ")]
    assert len(started) == 1, done.stderr
    assert "--cpu 3000 --memory 3072" in started[0]
    session = started[0][len("Starting a cluster for this driver in "):].split(" (")[0]
    with open(os.path.join(session, "session.json")) as info:
        processes = json.load(info)["processes"]
    assert processes, session
    for _role, pid in processes:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
