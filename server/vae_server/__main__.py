"""vae-server: serve an exported VAE over gRPC."""

from __future__ import annotations

from vae_core.host import one_blas_thread, quiet_grpc_core

one_blas_thread()  # before numpy loads
quiet_grpc_core()  # before gRPC loads

import logging  # noqa: E402
import sys  # noqa: E402

from vae_core.manifest import ManifestError  # noqa: E402
from vae_server import loops  # noqa: E402
from vae_server.config import SettingsError, load_settings, unknown_variables  # noqa: E402

PROG = "vae-server"
USAGE_ERROR = 2  # as argparse's: the command line or the environment is at fault


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in unknown_variables():
        logging.getLogger("vae_server").warning(warning)
    from vae_server.server import serve

    try:
        if settings.worker_count > 1:
            from vae_server.workers import supervise

            return supervise(settings)
        return loops.run(serve(settings), settings.event_loop)
    except ManifestError as exc:
        print(f"{PROG}: cannot serve {settings.model_dir}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except RuntimeError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
