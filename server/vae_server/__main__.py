"""vae-server: serve an exported VAE over gRPC."""

from __future__ import annotations

import logging
import sys

from vae_export.manifest import ManifestError
from vae_server import loops
from vae_server.config import load_settings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vae_server.server import serve

    try:
        return loops.run(serve(settings), settings.event_loop)
    except ManifestError as exc:
        print(f"vae-server: cannot serve {settings.model_dir}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"vae-server: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
