"""Server settings: flags, VAE_ environment variables, and which wins."""

from __future__ import annotations

import pytest

from vae_server import loops
from vae_server.config import build_parser, load_settings


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


@pytest.mark.parametrize("argv", [["--provider", "tpu"], ["--max-batch-size", "0"],
                                  ["--batching", "maybe"], ["--event-loop", "trio"],
                                  ["--instances", "-1"]])
def test_bad_settings_stop_the_server_with_a_message(argv, capsys):
    with pytest.raises(SystemExit):
        load_settings(argv, env={})


def test_the_event_loop_is_uvloop_where_installed_and_asyncio_otherwise(monkeypatch):
    assert load_settings([], env={}).event_loop == "auto"
    assert loops.resolve("asyncio") == "asyncio"
    monkeypatch.setattr(loops, "uvloop_installed", lambda: True)
    assert loops.resolve("auto") == "uvloop"
    monkeypatch.setattr(loops, "uvloop_installed", lambda: False)
    assert loops.resolve("auto") == "asyncio"
    with pytest.raises(SystemExit, match="uvloop is not installed"):
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
