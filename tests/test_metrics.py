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
