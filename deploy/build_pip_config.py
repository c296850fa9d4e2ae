"""The pip configuration an image build needs to reach the package index the way this machine does.

`pip config list` (files and PIP_* variables) gives the index URLs, trusted hosts, timeouts and the
CA bundle this machine's pip uses. Local paths (find-links folders, file:// indexes, constraint
files) mean nothing inside a build, so only network settings are kept. The result goes to
`.docker-build/pip.conf`, with the CA bundle copied beside it; docker-compose.yml hands both to
the Dockerfile as build secrets (mounted for the `pip install` steps only, never in a layer).

    python deploy/build_pip_config.py OUT_DIR      # prints the FEDREID_PIP_CONF= and FEDREID_PIP_CA= lines
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

NETWORK_KEYS = ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries", "proxy")
SECRET_CA = "/run/secrets/pip_ca"  # where the Dockerfile's secret mount puts the CA bundle


def pip_settings(listing: str) -> dict[str, str]:
    """`scope.key='value'` lines into key -> value; later scopes (environment) win, as in pip."""
    settings: dict[str, str] = {}
    for line in listing.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            settings[name.rpartition(".")[2]] = ast.literal_eval(value) if value[:1] in "'\"" else value
    return settings


def build_config(settings: dict[str, str], ca_copied: bool) -> str:
    """A [global] section with the network settings only (local file:// and path entries dropped)."""
    lines = ["[global]"]
    for key in NETWORK_KEYS:
        if key not in settings:
            continue
        value = settings[key]
        if key.endswith("index-url"):
            value = " ".join(url for url in value.split() if url.startswith(("http://", "https://")))
        if value:
            lines.append(f"{key} = {value}")
    if ca_copied:
        lines.append(f"cert = {SECRET_CA}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else ".docker-build")
    out.mkdir(parents=True, exist_ok=True)
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = pip_settings(listing)
    ca = Path(settings.get("cert", ""))
    ca_copied = bool(settings.get("cert")) and ca.is_file()
    if ca_copied:
        shutil.copyfile(ca, out / "pip-ca.crt")
    (out / "pip.conf").write_text(build_config(settings, ca_copied))
    print(f"FEDREID_PIP_CONF={(out / 'pip.conf').resolve()}")
    print(f"FEDREID_PIP_CA={(out / 'pip-ca.crt').resolve() if ca_copied else '/dev/null'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
