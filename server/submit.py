"""`fedreid-submit`: submit a run to a deployed SuperLink, follow it, and say how it ended.

    fedreid-submit --superlink fl.example.org:9093 --ca certs/ca.crt --sites 3 \\
        --run-config 'profile="demo" output-dir="/srv/fedreid/outputs"'

The same as writing a connection into `$FLWR_HOME/config.toml` and calling `flwr run . <connection>
--stream` yourself (the README shows both), plus what a script needs: it waits until `--sites`
SuperNodes are online, streams the run's log, and exits 0 only when the SuperLink reports the run as
`finished:completed` (`flwr run` itself exits 0 on failed runs too). When the run's output folder
is visible from here, it prints the per-site table.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path

from server.flower_cli import SuperLinkConnection
from server.outputs import TABLE_FILE

log = logging.getLogger("fedreid.submit")
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink's Control API")
    parser.add_argument("--ca", type=Path, default=None, help="CA certificate of the SuperLink (ca.crt)")
    parser.add_argument("--insecure", action="store_true", help="the SuperLink runs without TLS (local trials)")
    parser.add_argument("--sites", type=int, default=1, help="wait until this many sites are online")
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for the sites (default 600)")
    parser.add_argument("--run-config", default="", help="Flower run config, e.g. 'profile=\"demo\"'")
    parser.add_argument("--app", type=Path, default=REPO_ROOT, help="the Flower app folder (default: this project)")
    parser.add_argument("--flwr-home", type=Path, default=None, help="FLWR_HOME for the CLI (default: temporary)")
    return parser.parse_args(argv)


def _output_dir(run_config: str) -> Path | None:
    for token in shlex.split(run_config):
        key, _, value = token.partition("=")
        if key == "output-dir" and value:
            return Path(value)
    return None


def print_table(run_config: str, run_id: int) -> None:
    output_dir = _output_dir(run_config)
    folders = sorted(output_dir.glob(f"*-run{run_id}")) if output_dir and output_dir.is_dir() else []
    resumed = [p for p in output_dir.glob("*") if (p / TABLE_FILE).is_file()] if output_dir and not folders else []
    for folder in folders or sorted(resumed, key=lambda p: (p / TABLE_FILE).stat().st_mtime)[-1:]:
        print("\n" + (folder / TABLE_FILE).read_text())
        print(f"outputs: {folder}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if not args.insecure and (args.ca is None or not args.ca.is_file()):
        log.error("--ca must name the SuperLink's CA certificate (made by fedreid-certs), or pass --insecure")
        return 2
    with tempfile.TemporaryDirectory(prefix="fedreid-submit-") as scratch:
        home = args.flwr_home or Path(scratch)
        connection = SuperLinkConnection(args.superlink, home, None if args.insecure else args.ca)
        try:
            log.info("waiting for %d site(s) at %s", args.sites, args.superlink)
            connection.wait_for_nodes(args.sites, args.wait)
            run_id = connection.submit(args.app, args.run_config)
        except RuntimeError as error:
            log.error("%s", error)
            return 1
        log.info("run %d submitted; streaming its log", run_id)
        try:
            connection.stream(run_id)
        except RuntimeError as error:  # the SuperLink went away: its last word on the run is asked below
            log.warning("%s", error)
        status = connection.wait_finished(run_id, timeout=300)
        connection.close()
    if status != "finished:completed":
        log.error("run %d ended as %s", run_id, status)
        return 1
    log.info("run %d completed", run_id)
    print_table(args.run_config, run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
