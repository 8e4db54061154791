"""The server's Prometheus registry."""

from __future__ import annotations


def test_metrics_include_process_cpu_and_memory_and_skip_gpus_cleanly():
    from vae_server.metrics import GpuCollector, Metrics

    m = Metrics()
    assert m.registry.get_sample_value("process_resident_memory_bytes") > 0
    assert m.registry.get_sample_value("process_cpu_seconds_total") >= 0
    if GpuCollector().count == 0:  # no GPU here: no GPU series, and no error
        names = {s.name for f in m.registry.collect() for s in f.samples}
        assert not any(n.startswith("vae_gpu_") for n in names)


def test_queue_depth_is_read_from_the_queue_when_scraped():
    from prometheus_client import CollectorRegistry

    from vae_server.metrics import Metrics

    m = Metrics(CollectorRegistry(), gpu=False)
    queued = {"decoder": 0}
    m.watch_queue("decoder", lambda: queued["decoder"])
    assert m.registry.get_sample_value("vae_queue_depth", {"model": "decoder"}) == 0
    queued["decoder"] = 1500
    assert m.registry.get_sample_value("vae_queue_depth", {"model": "decoder"}) == 1500
