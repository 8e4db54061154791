"""Server settings: flags, VAE_ environment variables, and which wins."""

from __future__ import annotations

import os
import subprocess

import pytest

from serving import VENV_BIN
from vae_core.host import cores
from vae_server import loops
from vae_server.config import SettingsError, build_parser, load_settings, unknown_variables


def test_defaults_follow_the_design():
    s = load_settings([], env={})
    assert (s.port, s.metrics_port, s.batching) == (50051, 8000, True)


def test_environment_variables_set_every_flag_and_flags_win():
    env = {"VAE_MODEL_DIR": "/m", "VAE_PORT": "6000", "VAE_BATCHING": "off",
           "VAE_MAX_DELAY_MS": "2.5", "VAE_MAX_BATCH_SIZE": "64"}
    s = load_settings([], env=env)
    assert (s.model_dir, s.port, s.batching, s.max_delay_ms, s.max_batch_size) == (
        "/m", 6000, False, 2.5, 64)
    assert load_settings(["--port", "7000"], env=env).port == 7000


def test_every_flag_names_its_environment_variable_in_help():
    text = build_parser(env={}).format_help()
    for flag in ("--model-dir", "--max-queue-images", "--grace-seconds", "--provider"):
        assert flag in text
        assert "VAE_" + flag[2:].replace("-", "_").upper() in text


def test_help_prints_whatever_the_variables_hold():
    """Before: a VAE_ variable that could not be read stopped --help with its error, so the
    user could not read what it should hold."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    proc = subprocess.run([str(VENV_BIN / "vae-server"), "--help"],
                          env={**clean, "VAE_MAX_BATCH_SIZE": "abc"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--max-batch-size" in proc.stdout and "VAE_MAX_BATCH_SIZE" in proc.stdout


@pytest.mark.parametrize(("given", "bound"), [("::1", "[::1]"), ("[::1]", "[::1]"),
                                              ("::", "[::]"), ("127.0.0.1", "127.0.0.1"),
                                              ("localhost", "localhost")])
def test_an_ipv6_host_is_bracketed_as_grpc_binds_it(given, bound):
    """Before: --host ::1 failed with gRPC's own "Failed to bind to address ::1:50051"."""
    assert load_settings(["--host", given], env={}).host == bound


# Every kind of setting, wrong from a flag and from a VAE_ variable: (argv, env, the setting
# the one-line message must name, words it must hold).
BAD_SETTINGS = {
    "int variable": ([], {"VAE_PORT": "abc"}, "VAE_PORT", "'abc' is not an integer"),
    "int flag": (["--port", "abc"], {}, "--port", "'abc' is not an integer"),
    "float variable": ([], {"VAE_MAX_DELAY_MS": "soon"}, "VAE_MAX_DELAY_MS", "not a number"),
    "float flag": (["--grace-seconds", "1,5"], {}, "--grace-seconds", "not a number"),
    "bool variable": ([], {"VAE_BATCHING": "maybe"}, "VAE_BATCHING", "not a boolean"),
    "bool flag": (["--spinning", "2"], {}, "--spinning", "not a boolean"),
    "choice variable": ([], {"VAE_PROVIDER": "tpu"}, "--provider", "not one of auto, cuda, cpu"),
    "choice flag": (["--io-binding", "sometimes"], {}, "--io-binding", "not one of"),
    "log level": (["--log-level", "chatty"], {}, "--log-level", "not one of"),
    "event loop": (["--event-loop", "trio"], {}, "--event-loop", "trio"),
    "port range": ([], {"VAE_METRICS_PORT": "70000"}, "--metrics-port", "not a port"),
    "count below 1": (["--max-batch-size", "0"], {}, "--max-batch-size", ">= 1"),
    "negative": ([], {"VAE_INSTANCES": "-1"}, "--instances", ">= 0"),
    "over the queue": (["--max-sample-n", "100000", "--max-queue-images", "65536"], {},
                       "--max-sample-n", "--max-queue-images"),
    "replies over the message limit": (["--max-message-mb", "8"], {}, "--max-sample-n",
                                       "over --max-message-mb 8"),
    "message limit past gRPC's": (["--max-message-mb", "4096"], {}, "--max-message-mb",
                                  "at most 2047"),
    "graphs on the CPU": (["--cuda-graphs", "true", "--provider", "cpu"], {}, "--cuda-graphs",
                          "CUDA provider"),
    "unknown flag": (["--batch-window", "8"], {}, "--batch-window", "unrecognized"),
    "file": (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], {},
             "--tls-cert", "cannot read"),
    "token variable": ([], {"VAE_AUTH_TOKENS": "has space"}, "VAE_AUTH_TOKENS", "token 1"),
    # Before: accepted, then the server crashed at the start (gRPC's C int) or at SIGTERM
    # (nan as a sleep), or sent every connection away at once (0.0001 s is 0 ms).
    "pending calls past gRPC's": (["--max-pending-calls", "2147483648"], {},
                                  "--max-pending-calls", "at most 2147483647"),
    "no pending calls": ([], {"VAE_MAX_PENDING_CALLS": "0"}, "--max-pending-calls", ">= 1"),
    "age inf": (["--max-connection-age-s", "inf"], {}, "--max-connection-age-s",
                "'inf' is not a finite number"),
    "age past gRPC's": (["--max-connection-age-s", "2592000"], {}, "--max-connection-age-s",
                        "at most 2147483"),
    "age grace past gRPC's": ([], {"VAE_MAX_CONNECTION_AGE_GRACE_S": "2592000"},
                              "--max-connection-age-grace-s", "at most 2147483"),
    "age under 1 ms": (["--max-connection-age-s", "0.0001"], {}, "--max-connection-age-s",
                       "under 0.001"),
    "grace nan": (["--grace-seconds", "nan"], {}, "--grace-seconds",
                  "'nan' is not a finite number"),
    "drain delay nan variable": ([], {"VAE_DRAIN_DELAY_S": "NaN"}, "VAE_DRAIN_DELAY_S",
                                 "'NaN' is not a finite number"),
    "delay -inf": (["--max-delay-ms=-inf"], {}, "--max-delay-ms", "not a finite number"),
    # Before, these started: every SampleStream left at chunk_size 0 was then refused for
    # a size the caller never sent, and the max_k that GetModelInfo offered was refused.
    "default chunk over the largest": (["--max-chunk-size", "1000"], {},
                                       "--default-chunk-size",
                                       "--default-chunk-size 1024 exceeds --max-chunk-size 1000"),
    "max k over the queue": ([], {"VAE_MAX_QUEUE_IMAGES": "4096", "VAE_MAX_SAMPLE_N": "4096",
                                  "VAE_MAX_IMAGES_PER_REQUEST": "4096",
                                  "VAE_MAX_CHUNK_SIZE": "4096", "VAE_MAX_BATCH_SIZE": "1024"},
                             "--max-k", "--max-k 10000 exceeds --max-queue-images 4096"),
    # A queue lowered alone: every limit it bounds is named in the one line.
    "queue alone": (["--max-queue-images", "1000"], {}, "--max-queue-images",
                    "--max-batch-size 2048 exceeds --max-queue-images 1000; "
                    "--max-images-per-request 8192 exceeds --max-queue-images 1000; "
                    "--max-sample-n 8192 exceeds --max-queue-images 1000; "
                    "--max-chunk-size 8192 exceeds --max-queue-images 1000; "
                    "--max-k 10000 exceeds --max-queue-images 1000; "
                    "--default-chunk-size 1024 exceeds --max-queue-images 1000: each must be at "
                    "most its bound"),
    # A watch that fires faster than a busy worker's loop answers would kill healthy ones.
    "worker timeout under 1 s": (["--worker-timeout-s", "0.5"], {}, "--worker-timeout-s",
                                 "under 1; 0 = never"),
    "worker timeout negative": ([], {"VAE_WORKER_TIMEOUT_S": "-1"}, "--worker-timeout-s",
                                "negative"),
    "worker start timeout under 1 s": (["--worker-start-timeout-s", "0.5"], {},
                                       "--worker-start-timeout-s", "under 1; 0 = never"),
    # Before: accepted, then every GetModelInfo (which every vae-client command calls first)
    # failed with INTERNAL, "Value out of range", for its uint32 and uint64 fields.
    "queue past GetModelInfo's uint32": (["--max-queue-images", str(2**32)], {},
                                         "--max-queue-images", "at most 4294967295"),
    "stream n past GetModelInfo's uint64": ([], {"VAE_MAX_STREAM_N": str(2**64)},
                                            "--max-stream-n", "at most 18446744073709551615"),
    # Before: "²".isdigit() held and int("²") raised, a traceback; "٣" started 3 workers.
    "workers not ASCII": (["--workers", "\u00b2"], {}, "--workers", "not a count"),
    "workers another script's digit": (["--workers", "\u0663"], {}, "--workers",
                                       "not a count"),
    # Before: accepted. 10^20 workers, or 100 on 2 cores at about 150 MB each; a thread pool
    # of 2 x 10^6 threads; a supervisor stopped with grace 1e300 died of an OverflowError.
    "workers past 4 a core": (["--workers", str(4 * cores() + 1)], {}, "--workers",
                              f"more than 4 per core this process may use; it must be at most "
                              f"{4 * cores()} here"),
    "workers 10^20": ([], {"VAE_WORKERS": "1" + "0" * 20}, "--workers", "more than 4 per core"),
    "instances": (["--instances", "1000000"], {}, "--instances", "it must be at most 256"),
    "threads": ([], {"VAE_THREADS": "100000"}, "--threads", "it must be at most 1024"),
    "grace past a day": (["--grace-seconds", "1e300"], {}, "--grace-seconds",
                         "it must be at most 86400"),
    "drain past a day": ([], {"VAE_DRAIN_DELAY_S": "86401"}, "--drain-delay-s",
                         "it must be at most 86400"),
    "worker start timeout past a day": (["--worker-start-timeout-s", "1e10"], {},
                                        "--worker-start-timeout-s", "it must be at most 86400"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_a_bad_setting_is_one_error_naming_it(case):
    argv, env, setting, words = BAD_SETTINGS[case]
    with pytest.raises(SettingsError) as err:
        load_settings(argv, env=env)
    message = str(err.value)
    assert setting in message and words in message, message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["int variable", "float flag", "bool variable",
                                  "choice variable", "port range", "unknown flag", "file",
                                  "token variable", "message limit past gRPC's",
                                  "age past gRPC's", "grace nan",
                                  "drain delay nan variable"])
def test_vae_server_prints_one_line_and_exits_2(case, tmp_path):
    """The real program, as a user starts it: one line on stderr, status 2, no traceback."""
    argv, env, setting, words = BAD_SETTINGS[case]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    proc = subprocess.run([str(VENV_BIN / "vae-server"), "--model-dir", str(tmp_path), *argv],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vae-server: ") and setting in lines[0] and words in lines[0]
    assert proc.stdout == ""


def test_no_float_setting_takes_inf_or_nan():
    """Every float setting, from a flag and from its variable (nan compares false with every
    bound, so a range check alone lets it through)."""
    import dataclasses

    from vae_server.config import Settings

    floats = [f.name for f in dataclasses.fields(Settings) if isinstance(f.default, float)]
    assert {"max_delay_ms", "grace_seconds", "drain_delay_s", "max_connection_age_s",
            "max_connection_age_grace_s"} <= set(floats)
    for name in floats:
        flag, var = "--" + name.replace("_", "-"), "VAE_" + name.upper()
        for value in ("nan", "inf", "-inf", "Infinity"):
            with pytest.raises(SettingsError, match="not a finite number"):
                load_settings([f"{flag}={value}"], env={})
            with pytest.raises(SettingsError, match=f"{var}: .* not a finite number"):
                load_settings([], env={var: value})


def test_connection_ages_reach_grpc_as_the_milliseconds_given():
    from vae_server.config import MAX_CONNECTION_AGE_S
    from vae_server.server import grpc_options

    def options(*argv: str) -> dict[str, int]:
        return dict(grpc_options(load_settings(list(argv), env={})))

    most = options("--max-connection-age-s", str(MAX_CONNECTION_AGE_S),
                   "--max-connection-age-grace-s", str(MAX_CONNECTION_AGE_S))
    assert most["grpc.max_connection_age_ms"] <= 2**31 - 1
    assert most["grpc.max_connection_age_grace_ms"] <= 2**31 - 1
    assert options("--max-connection-age-s", "0.001")["grpc.max_connection_age_ms"] == 1
    assert "grpc.max_connection_age_ms" not in options("--max-connection-age-s", "0")


def test_pending_calls_reach_grpc_as_both_of_its_bounds():
    from vae_server.server import grpc_options

    options = dict(grpc_options(load_settings(["--max-pending-calls", "123"], env={})))
    assert options["grpc.server.max_pending_requests"] == 123
    assert options["grpc.server.max_pending_requests_hard_limit"] == 123


def test_a_connection_limit_reaches_grpc_and_none_is_the_default():
    from vae_server.server import grpc_options

    def options(*argv: str) -> dict[str, int]:
        return dict(grpc_options(load_settings(list(argv), env={})))

    assert options("--max-connections", "500")["grpc.max_allowed_incoming_connections"] == 500
    assert options(
        "--max-connections", str(2**31 - 1))["grpc.max_allowed_incoming_connections"] == 2**31 - 1
    assert "grpc.max_allowed_incoming_connections" not in options()
    assert "grpc.max_allowed_incoming_connections" not in options("--max-connections", "0")
    with pytest.raises(SettingsError, match="--max-connections: -1 is negative"):
        load_settings(["--max-connections", "-1"], env={})
    with pytest.raises(SettingsError, match=f"--max-connections: {2**31}; it must be at most"):
        load_settings([], env={"VAE_MAX_CONNECTIONS": str(2**31)})


def test_a_model_directory_that_cannot_be_served_exits_2(tmp_path):
    proc = subprocess.run([str(VENV_BIN / "vae-server"), "--model-dir", str(tmp_path / "none"),
                           "--port", "0", "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("vae-server: cannot serve")


def test_a_misspelt_variable_is_named_with_the_setting_it_may_stand_for(tmp_path):
    """Before: VAE_GRACE_SECOND=20 was ignored without a word, and the drain kept its 10 s;
    a Deployment's typo cut calls off at every rollout. vae-client's variables are no typo."""
    assert unknown_variables({"VAE_PORT": "1", "VAE_TARGET": "x", "VAE_TOKEN": "t",
                              "VAE_AUTH_TOKENS": "a", "VAE_FUZZ_SCALE": "10", "PATH": "/bin"}) == []
    # What Kubernetes sets for a Service named vae-serving in the namespace: no typo either.
    links = {"VAE_SERVING_SERVICE_HOST": "10.0.0.9", "VAE_SERVING_SERVICE_PORT": "50051",
             "VAE_SERVING_SERVICE_PORT_GRPC": "50051", "VAE_SERVING_PORT": "tcp://10.0.0.9:50051",
             "VAE_SERVING_PORT_50051_TCP": "tcp://10.0.0.9:50051",
             "VAE_SERVING_PORT_50051_TCP_PROTO": "tcp", "VAE_SERVING_PORT_50051_TCP_PORT": "50051",
             "VAE_SERVING_PORT_50051_TCP_ADDR": "10.0.0.9"}
    assert unknown_variables(links) == []
    # A setting misspelt into the same shape is still named.
    assert unknown_variables({"VAE_METRIC_PORT": "9000"}) == [
        "VAE_METRIC_PORT is not a setting of vae-server (did you mean VAE_METRICS_PORT?): it is "
        "ignored"]
    assert unknown_variables({"VAE_WORKER": "2", "VAE_SOMETHING_ELSE": "1"}) == [
        "VAE_SOMETHING_ELSE is not a setting of vae-server: it is ignored",
        "VAE_WORKER is not a setting of vae-server (did you mean VAE_WORKERS?): it is ignored"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    proc = subprocess.run([str(VENV_BIN / "vae-server"), "--model-dir", str(tmp_path / "none"),
                           "--port", "0", "--metrics-port", "-1"],
                          env={**clean, "VAE_GRACE_SECOND": "20"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr  # the model directory: the warning came first
    assert "WARNING vae_server: VAE_GRACE_SECOND is not a setting of vae-server (did you mean " \
           "VAE_GRACE_SECONDS?): it is ignored" in proc.stderr, proc.stderr


def test_the_event_loop_is_uvloop_where_installed_and_asyncio_otherwise(monkeypatch):
    assert load_settings([], env={}).event_loop == "auto"
    assert loops.resolve("asyncio") == "asyncio"
    monkeypatch.setattr(loops, "uvloop_installed", lambda: True)
    assert loops.resolve("auto") == "uvloop"
    monkeypatch.setattr(loops, "uvloop_installed", lambda: False)
    assert loops.resolve("auto") == "asyncio"
    with pytest.raises(SettingsError, match="uvloop is not installed"):
        load_settings(["--event-loop", "uvloop"], env={})


@pytest.mark.parametrize("spinning", [True, False])
def test_only_the_large_batch_sessions_spin(model_dir, spinning):
    from vae_server.runtime import ModelRuntime

    rt = ModelRuntime(model_dir, provider="cpu", threads=2, spinning=spinning)

    def spins(session) -> str:
        return session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning")

    assert load_settings([], env={}).spinning is False  # a mixed load loses with it on
    assert [spins(rt.encoder), spins(rt.decoder)] == ["1" if spinning else "0"] * 2
    assert [spins(rt.encoder_small), spins(rt.decoder_small)] == ["0", "0"]


def test_instances_are_one_per_core_on_the_cpu_unless_given(model_dir):
    import os

    from vae_server.runtime import ModelRuntime

    rt = ModelRuntime(model_dir, provider="cpu")
    assert load_settings([], env={}).instances == 0  # auto
    assert rt.instances(0) == len(os.sched_getaffinity(0))
    assert rt.instances(3) == 3
