"""onnxruntime as the project imports it: `from vae_core.ort import ort`. Its telemetry is
read once, when it loads, so the setting comes first (host.no_onnxruntime_telemetry)."""

from vae_core.host import no_onnxruntime_telemetry

no_onnxruntime_telemetry()

import onnxruntime as ort  # noqa: E402

__all__ = ["ort"]
