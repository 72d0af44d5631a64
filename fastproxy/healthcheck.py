"""`python -m fastproxy.healthcheck`: exit 0 when this machine's proxy answers /ready with 200.

For container health checks: it reads the same PORT and TLS_CERT as the proxy (so a platform
that sets PORT, or TLS on the node, needs no other command). The certificate is not verified:
the check talks to 127.0.0.1, not to the name on the certificate.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("PORT", "8000").strip() or "8000"
    scheme = "https" if os.environ.get("TLS_CERT", "").strip() else "http"
    context = ssl._create_unverified_context() if scheme == "https" else None
    try:
        with urllib.request.urlopen(
            f"{scheme}://127.0.0.1:{port}/ready", timeout=2, context=context
        ) as response:
            return 0 if response.status == 200 else 1
    except (OSError, urllib.error.URLError, ValueError) as exc:
        print(f"fastproxy not ready on port {port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
