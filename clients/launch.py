"""`fedreid-client`: one line to join a camera site to the federation from its edge box.

    fedreid-client --server fl.example.org:9092 --dataset mall --data-root /data/mall \\
        --ca certs/ca.crt --key certs/sites/mall [--gpu 0]

A thin wrapper over Flower's `flower-supernode`: it first checks the site's data layout (and
fails with the path and the expected layout if it is wrong, before any connection is made), then
replaces itself with a SuperNode whose `node_config` carries the site's dataset name, data root,
GPU and state folder. TLS (verified against `--ca`) and SuperNode authentication (`--key`, the
site's private key from `fedreid-certs create`) are on unless `--insecure` (local trials only).

The state folder (default `./fedreid-state/<dataset>`) keeps what must survive a restart of the
box: the site's classifier head and pruning masks (written by the ClientApp after every round) and
Flower's own home (the installed app).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from clients.worker_link import LAUNCH_FILE, WORKER_KEY, socket_path
from reid.data.dataset import load_reid_data
from reid.data.layout import DatasetLayoutError
from reid.data.synthetic import generate_site
from server.flower_cli import with_flower_tuning

log = logging.getLogger("fedreid.client")


def console_script(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="HOST:PORT of the SuperLink's Fleet API (gRPC)")
    parser.add_argument("--dataset", required=True, help="this site's name (reported in every result)")
    parser.add_argument("--data-root", required=True, type=Path, help="folder with train/, query/, gallery/")
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device index (default: first GPU, else CPU)")
    parser.add_argument("--ca", type=Path, default=None, help="CA certificate that signed the server's (ca.crt)")
    parser.add_argument("--key", type=Path, default=None, help="this site's authentication private key")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no authentication: local trials only")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="site-local state: head, masks, Flower home (default ./fedreid-state/<dataset>)")
    parser.add_argument("--runtime-port", type=int, default=9094,
                        help="local port of the SuperNode's Runtime API (distinct per SuperNode on one host)")
    parser.add_argument("--max-wait-time", type=float, default=None,
                        help="give up after this many seconds without the SuperLink (default: retry forever)")
    parser.add_argument("--synthetic-site", type=int, default=None, metavar="INDEX",
                        help="demo boxes: if --data-root holds no images yet, first generate synthetic camera "
                             "site INDEX there (a folder with real images is never touched)")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="CPU threads for this site's training (default: every core); set it when several "
                             "sites or other services share the box, or they slow each other down")
    parser.add_argument("--no-worker", action="store_true",
                        help="do the work in Flower's per-message ClientApp process instead of a long-lived site "
                             "worker (slower: every round re-imports torch and reloads the caches)")
    parser.add_argument("--images-per-identity", type=float, default=None,
                        help="FedUReID sites: this site's own estimate of images per person, from which it plans "
                             "its clustering (default: the run's algorithm.unsupervised.images_per_identity)")
    parser.add_argument("--check-only", action="store_true", help="check the data layout and the key files, then exit")
    return parser.parse_args(argv)


def ensure_synthetic_site(root: Path, index: int) -> bool:
    """Generate synthetic site ``index`` into ``root`` unless it already holds images; True if generated.

    A marker file makes an interrupted generation restart on the next launch instead of leaving a
    half-written site, and keeps a folder with real images (no marker) safe from being overwritten.
    """
    marker = root / ".synthetic-incomplete"
    has_images = any(p.suffix.lower() in {".jpg", ".jpeg", ".png"} for p in root.rglob("*") if p.is_file())
    if has_images and not marker.exists():
        return False
    root.mkdir(parents=True, exist_ok=True)
    marker.touch()
    log.info("generating synthetic camera site %d in %s", index, root)
    generate_site(root, index, seed=0, overwrite=True)
    marker.unlink()
    return True


def check_site(args: argparse.Namespace) -> str:
    """The data layout and the TLS files, checked before connecting; raise with what is wrong."""
    # train/ may be unlabelled crops (a FedUReID site); a supervised run names the problem at its first round
    data = load_reid_data(args.data_root.expanduser().resolve(), name=args.dataset, verify=False,
                          labelled_train=False)
    if not data.train:
        raise DatasetLayoutError(f"{args.data_root}: the train split holds no usable images")
    if not args.insecure:
        for flag, path in (("--ca", args.ca), ("--key", args.key)):
            if path is None:
                raise ValueError(f"{flag} is required (or --insecure for a local trial without TLS)")
            if not path.is_file():
                raise FileNotFoundError(f"{flag} {path} does not exist (made by `fedreid-certs create`)")
    return data.summary()


def supernode_command(args: argparse.Namespace, state_dir: Path, worker: Path | None = None) -> list[str]:
    root = args.data_root.expanduser().resolve()
    node_config = f'dataset="{args.dataset}" data-root="{root}" state-dir="{state_dir}"'
    if worker is not None:
        node_config += f' {WORKER_KEY}="{worker}"'
    if args.gpu is not None:
        node_config += f" gpu={args.gpu}"
    if args.images_per_identity is not None:
        node_config += f" images-per-identity={float(args.images_per_identity)}"
    command = [console_script("flower-supernode"), "--superlink", args.server, "--node-config", node_config,
               "--port", str(args.runtime_port)]
    if args.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(args.ca.resolve()),
                    "--auth-supernode-private-key", str(args.key.resolve())]
    if args.max_wait_time is not None:
        command += ["--max-wait-time", str(args.max_wait_time)]
    return command


def start_worker(state_dir: Path, env: dict[str, str], wait_s: float = 120.0) -> Path:
    """Start the site worker (clients/worker.py) for the SuperNode this process is about to become,
    record how to start it again, and return its socket once it listens."""
    path = socket_path(state_dir)
    command = [sys.executable, "-m", "clients.worker", "--socket", str(path), "--parent-pid", str(os.getpid())]
    path.with_name(LAUNCH_FILE).write_text(json.dumps({"command": command, "cwd": os.getcwd()}))
    path.unlink(missing_ok=True)
    worker = subprocess.Popen(command, env=env)  # noqa: S603 - inherits stderr: one log per site
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the site worker did not start (exit code {worker.poll()}); see the log above")
        time.sleep(0.05)
    log.info("site worker %d listens on %s", worker.pid, path)
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.synthetic_site is not None:
        ensure_synthetic_site(args.data_root.expanduser().resolve(), args.synthetic_site)
    try:
        summary = check_site(args)
    except (DatasetLayoutError, OSError, ValueError) as error:
        log.error("cannot start site %s: %s", args.dataset, error)
        return 2
    log.info("data ok: %s", summary)
    if args.check_only:
        return 0
    if args.insecure:
        log.warning("--insecure: no TLS and no authentication; use this for local trials only")
    state_dir = (args.state_dir or Path("fedreid-state") / args.dataset).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("FLWR_HOME", str(state_dir / "flwr-home"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if args.cpu_threads is not None:  # read by torch (OpenMP, MKL) when the worker imports it
        env.update({"OMP_NUM_THREADS": str(args.cpu_threads), "MKL_NUM_THREADS": str(args.cpu_threads)})
    with_flower_tuning(env)  # Flower's polls and transfer sizes; an operator's own setting wins
    worker = None if args.no_worker else start_worker(state_dir, env)
    command = supernode_command(args, state_dir, worker)
    log.info("starting %s", " ".join(command))
    sys.stdout.flush()
    os.execvpe(command[0], command, env)  # the SuperNode takes over this process (signals, exit code)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
