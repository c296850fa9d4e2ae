"""`fedreid-server`: the federation's SuperLink, with TLS and SuperNode authentication on by default.

    fedreid-server --certs certs/                     # Fleet API (gRPC) on :9092, Control API on :9093
    fedreid-certs register certs/ --superlink localhost:9093
    flwr run . fedreid --stream --run-config 'output-dir="/srv/fedreid/outputs"'

A thin wrapper over Flower's `flower-superlink`: it checks that the certificate files from
`fedreid-certs create` exist, then replaces itself with a SuperLink (Flower's own, started through
server/superlink_main.py for a longer SQLite busy timeout) that serves

- the Fleet API (gRPC, where the sites' SuperNodes connect) on `--host`:`--fleet-port` (all
  interfaces by default),
- the Control API (where `flwr run`, `flwr ls` and `fedreid-certs register` connect) and the Runtime
  API of the ServerApp on `--control-host`:`--control-port` (this machine only by default: the
  open-source Control API authenticates no user),

with TLS from `--certs`, `--enable-supernode-auth` (only registered site keys may join), a state
database under `--state-dir` (runs and registered keys survive a restart; message payloads are kept
in memory unless `--payloads database`; `--in-memory-state` keeps everything in memory), and no runtime
dependency installation (the image or venv already holds everything). The ServerApp runs as the
SuperLink's subprocess, so its output folder is relative to this process's working directory; give
runs an absolute `output-dir`.

`--insecure` turns TLS and authentication off, for local trials only, and says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from server.certs import CertPaths
from server.flower_cli import flwr_environment
from server.superlink_main import (ACCESS_LOG_VARIABLE, BUSY_TIMEOUT_VARIABLE, DEFAULT_BUSY_TIMEOUT_MS,
                                   PAYLOAD_STORES, PAYLOADS_VARIABLE)

log = logging.getLogger("fedreid.server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certs", type=Path, default=Path("certs"), help="folder made by `fedreid-certs create`")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no authentication: local trials only")
    parser.add_argument("--host", default="0.0.0.0", help="Fleet API address, where sites connect (default: all "
                        "interfaces)")
    parser.add_argument("--control-host", default="127.0.0.1",
                        help="Control API address (default: this machine only). Flower's open-source Control API "
                             "has no user authentication: whoever reaches it can submit runs and register keys, so "
                             "open it (0.0.0.0) only behind a firewall")
    parser.add_argument("--fleet-port", type=int, default=9092, help="Fleet API (gRPC) port for the sites")
    parser.add_argument("--control-port", type=int, default=9093, help="Control/Runtime API port (flwr CLI)")
    parser.add_argument("--state-dir", type=Path, default=Path("fedreid-state/superlink"),
                        help="SuperLink database and Flower home; keep it to survive restarts")
    parser.add_argument("--db-busy-timeout", type=float, default=DEFAULT_BUSY_TIMEOUT_MS / 1000, metavar="SECONDS",
                        help="how long a write waits for the SQLite state before failing (Flower's own 5 s "
                             "dropped replies with 20 sites on a busy 2-core server)")
    parser.add_argument("--in-memory-state", action="store_true",
                        help="keep runs and registered keys in memory too, instead of the SQLite database: a "
                             "restarted SuperLink has forgotten the sites' keys (register them again)")
    parser.add_argument("--payloads", choices=PAYLOAD_STORES, default=os.environ.get(PAYLOADS_VARIABLE, "memory"),
                        help="where message payloads (the models in flight) wait: memory (default; one copy of the "
                             "global model plus the replies not yet aggregated) or the SQLite database (Flower's "
                             "own; 4.6 s more per round that moves six 98 MB messages, bench/round_overhead.py)")
    parser.add_argument("--access-log", action="store_true",
                        default=os.environ.get(ACCESS_LOG_VARIABLE) == "1",
                        help="log every HTTP request to the Control/Runtime API (default: failed ones only; "
                             f"the ServerApp polls ten times a second). Also {ACCESS_LOG_VARIABLE}=1")
    return parser.parse_args(argv)


def superlink_command(args: argparse.Namespace) -> list[str]:
    state = args.state_dir.expanduser().resolve()
    command = [sys.executable, "-m", "server.superlink_main", "--fleet-api-address", f"{args.host}:{args.fleet_port}",
               "--host", args.control_host, "--port", str(args.control_port),
               "--disable-runtime-dependency-installation", "--log-file", str(state / "superlink.log")]
    if not args.in_memory_state:
        command += ["--database", str(state / "superlink.db")]
    if args.insecure:
        return [*command, "--insecure"]
    paths = CertPaths(args.certs.expanduser().resolve())
    return [*command, "--ssl-ca-certfile", str(paths.ca_cert), "--ssl-certfile", str(paths.server_cert),
            "--ssl-keyfile", str(paths.server_key), "--enable-supernode-auth"]


def check_certs(args: argparse.Namespace) -> None:
    paths = CertPaths(args.certs.expanduser().resolve())
    missing = [p for p in (paths.ca_cert, paths.server_cert, paths.server_key) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(map(str, missing))}; create them with "
                                f"`fedreid-certs create {args.certs} --san <server name or IP> --site <site> ...` "
                                f"(or pass --insecure for a local trial)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.insecure:
        log.warning("--insecure: no TLS and no SuperNode authentication; any process can join and read the "
                    "traffic. Use this for local trials only.")
    else:
        try:
            check_certs(args)
        except FileNotFoundError as error:
            log.error("%s", error)
            return 2
    state = args.state_dir.expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    env = flwr_environment(Path(os.environ.get("FLWR_HOME", state / "flwr-home")))
    env[BUSY_TIMEOUT_VARIABLE] = str(int(args.db_busy_timeout * 1000))
    env[ACCESS_LOG_VARIABLE] = "1" if args.access_log else "0"
    env[PAYLOADS_VARIABLE] = args.payloads
    command = superlink_command(args)
    log.info("starting %s", " ".join(command))
    sys.stdout.flush()
    os.execvpe(command[0], command, env)  # the SuperLink takes over this process (signals, exit code)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
