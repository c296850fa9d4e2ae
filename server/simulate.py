"""``fedreid-sim``: one command for a whole simulated federation on this machine.

It generates the synthetic camera sites when they are missing, starts a private simulation
SuperLink (own port, own FLWR_HOME, no runtime dependency installation), submits the app with
``flwr run`` on the Ray engine with one virtual SuperNode per site, streams the logs, checks that
the run really completed (``flwr run`` exits 0 even when a run fails), prints the per-site table,
and stops the SuperLink again, also on failure or Ctrl-C. The run's Ray is a head of its own, started
at the same moment as the SuperLink and stopped with the run (server/private_ray.py).

``--ray-address HOST:PORT`` runs the simulation's actors on an existing Ray cluster (started with
``ray start --head`` and ``ray start --address``) instead of the private one. Flower 1.39 no
longer passes an address to ``ray.init``; it calls ``ray.init()`` only when Ray is not initialised,
so the address travels as ``RAY_ADDRESS`` in the environment of the SuperLink, whose simulation
process inherits it. The address is checked before anything starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from reid.backbones import check_backbone
from reid.data.layout import site_folders
from reid.data.public import generate_public_set
from reid.data.federations import FEDERATIONS, federation_size, generate_sites, site_names
from server.config import compose_config
from server.private_ray import PrivateRay, PrivateRayError
from server.simulation_engine import write_launcher
from server.flower_cli import (
    SuperLinkConnection,
    console_script,
    flwr_environment,
    free_port,
    stop_process_group,
    wait_healthy,
)

log = logging.getLogger("fedreid.sim")
CONNECTION = "fedreid-sim"
REPO_ROOT = Path(__file__).resolve().parent.parent
FEDERATION_PROFILES = {"synthetic": "demo", "synthetic-resdrift": "resdrift", "synthetic-fedreid9": "fedreid9_synthetic"}


class SimulationError(RuntimeError):
    """The simulated run did not complete."""


@dataclass(frozen=True)
class SimulationRequest:
    """What to simulate and where to put it."""

    sites: int
    sites_root: Path
    output_dir: Path
    public_root: Path | None = None
    algorithm: str = "fedpav"
    profile: str = "demo"
    overrides: str = ""
    seed: int = 0
    cpus_per_site: int = 1
    gpus_per_site: float = 0.0
    app_dir: Path = REPO_ROOT
    flwr_home: Path | None = None  # None: a fresh one under .flwr/runs/, removed once the run completes
    site_names: tuple[str, ...] = ()  # a benchmark profile's sites (folders of sites_root), in order
    ray_address: str | None = None  # HOST:PORT of a running Ray cluster's head (GCS); None: private Ray


def ensure_synthetic_sites(root: Path, sites: int, seed: int, federation: str = "synthetic") -> None:
    """Generate the synthetic sites unless every expected site folder is already there."""
    names = site_names(sites, seed, federation)
    if all((root / name / split).is_dir() for name in names for split in ("train", "query", "gallery")):
        log.info("using the synthetic sites already in %s", root)
        return
    log.info("generating %d synthetic camera sites in %s (seed %d)", sites, root, seed)
    generate_sites(root, sites, seed, overwrite=True, federation=federation)


def ensure_public_set(root: Path, seed: int) -> None:
    """Generate the synthetic public image set (server-side KD and clustering) unless present."""
    if (root / "train").is_dir() and any((root / "train").iterdir()):
        return
    log.info("generating the synthetic public image set in %s", root)
    generate_public_set(root, seed, overwrite=True)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the address, when no Ray head (its GCS port) answers there."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise SimulationError(f"--ray-address {address!r}: give HOST:PORT of the Ray head's GCS "
                              f"(what `ray start --head --port PORT` printed)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise SimulationError(f"no Ray cluster answers at --ray-address {address} ({error}); start one with "
                              f"`ray start --head --port {port}` on {host} or fix the address") from None


def _environment(flwr_home: Path, ray_address: str | None = None) -> dict[str, str]:
    env = flwr_environment(flwr_home)
    env.update({
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",  # every site's progress lines, not "[repeated 3x]"
    })
    env.pop("RAY_ADDRESS", None)  # a private Ray unless asked: never an address left in this shell
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


class PrivateSuperLink:
    """A simulation SuperLink owned by this process: started on a free port, always stopped."""

    def __init__(self, flwr_home: Path, ray_address: str | None = None) -> None:
        self.flwr_home = flwr_home
        self.ray_address = ray_address
        self.port = free_port()
        self.log_file = flwr_home / "superlink.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.connection = SuperLinkConnection(f"127.0.0.1:{self.port}", flwr_home, None, name=CONNECTION)

    def __enter__(self) -> "PrivateSuperLink":
        command = [console_script("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                   "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation",
                   "--log-file", str(self.log_file)]
        env = _environment(self.flwr_home, self.ray_address)  # its simulation process: ours (simulation_engine)
        env["PATH"] = f"{write_launcher(self.flwr_home / 'bin')}{os.pathsep}{env['PATH']}"
        self.process = subprocess.Popen(command, env=env,
                                        stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait_healthy()
        return self

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        try:
            wait_healthy(f"http://127.0.0.1:{self.port}/health", self.process, timeout, "flower-superlink")
        except RuntimeError as error:
            raise SimulationError(f"{error}; see {self.log_file}") from None

    def stopped_from_outside(self) -> str | None:
        """Why the run cannot be reported, when this SuperLink ended although this process never
        stopped it (another program or a person did); None while it runs."""
        code = None if self.process is None else self.process.poll()
        if code is None:
            return None
        return (f"the run's SuperLink (pid {self.process.pid}, port {self.port}) was stopped from outside while the "  # type: ignore[union-attr]
                f"run was going (exit code {code}); its results so far are in the run folder, its log in "
                f"{self.log_file}")

    def __exit__(self, *_exc: object) -> None:
        """Stop the SuperLink and everything it started (SuperExec, the simulation, Ray)."""
        self.connection.close()
        stop_process_group(self.process)


def _site_names(request: SimulationRequest) -> tuple[str, ...]:
    """The sites by name, partition order: what every node (of a Ray cluster too) maps partitions by."""
    if request.site_names or not request.sites_root.is_dir():
        return request.site_names
    folders = [p.name for p in site_folders(request.sites_root)]
    return tuple(folders[:request.sites]) if len(folders) >= request.sites else ()


def _run_config(request: SimulationRequest) -> str:
    public = f"public.root={request.public_root.resolve()}" if request.public_root else ""
    values = {
        "algorithm": request.algorithm,
        "profile": request.profile,
        "overrides": " ".join(filter(None, [f"seed={request.seed}", public, request.overrides])),
        "sites-root": str(request.sites_root.resolve()),
        "site-names": " ".join(_site_names(request)),
        "output-dir": str(request.output_dir.resolve()),
    }
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def run_simulation(request: SimulationRequest) -> Path:
    """Run the federation; return the run's output folder or raise SimulationError.

    Without ``request.flwr_home`` the run gets a Flower home of its own (its connection, installed
    app and SuperLink log; the SuperLink has its own port anyway), removed once the run completes
    and kept, for its log, when it fails: any number of simulations can run side by side from one
    checkout, each to its own results."""
    if request.flwr_home is not None:
        return _run_simulation(request)
    private = Path(tempfile.mkdtemp(prefix=f"sim-{os.getpid()}-", dir=_runs_home()))
    folder = _run_simulation(replace(request, flwr_home=private))
    shutil.rmtree(private, ignore_errors=True)
    return folder


def _runs_home() -> Path:
    path = REPO_ROOT / ".flwr" / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_simulation(request: SimulationRequest) -> Path:
    assert request.flwr_home is not None
    federation = (f"num-supernodes={request.sites} client-resources-num-cpus={request.cpus_per_site} "
                  f"client-resources-num-gpus={float(request.gpus_per_site)}")
    private_ray = None
    if request.ray_address:
        check_ray_address(request.ray_address)
        log.info("simulating on the Ray cluster at %s", request.ray_address)
    else:  # a Ray head of the run's own, starting while the SuperLink does (server/private_ray.py)
        private_ray = PrivateRay().start()
    try:
        return _submit(request, federation, request.ray_address or (private_ray and private_ray.address_text),
                       private_ray)
    finally:
        if private_ray is not None:
            private_ray.stop()


def _submit(request: SimulationRequest, federation: str, ray_address: str | None,
            private_ray: PrivateRay | None) -> Path:
    assert request.flwr_home is not None
    with PrivateSuperLink(request.flwr_home, ray_address) as superlink:
        if private_ray is not None:
            try:
                private_ray.address()
            except PrivateRayError as error:
                raise SimulationError(str(error)) from None
        log.info("flwr %s", shlex.join(["run", str(request.app_dir), CONNECTION, "--stream", "--federation-config",
                                        federation, "--run-config", _run_config(request)]))  # its flwr equivalent
        try:
            run_id = superlink.connection.submit(request.app_dir, _run_config(request), federation)
            log.info("run %d started", run_id)
            superlink.connection.stream(run_id)
            gone = superlink.stopped_from_outside()
            runs = superlink.connection.runs(run_id) if gone is None else []
        except RuntimeError as error:
            gone = superlink.stopped_from_outside() or str(error)
        if gone is not None:
            raise SimulationError(gone)
    if not runs:
        raise SimulationError("no run was recorded by the SuperLink")
    run = runs[-1]
    if run["status"] != "finished:completed":
        raise SimulationError(f"run {run['run-id']} ended as {run['status']} ({run.get('status-details')}); "
                              f"see the log above and {request.flwr_home / 'superlink.log'}")
    folders = sorted(request.output_dir.resolve().glob(f"*-run{run['run-id']}"))
    if not folders:
        raise SimulationError(f"run {run['run-id']} completed but wrote no folder under {request.output_dir}")
    return folders[-1]


def parse_args(argv: list[str] | None = None) -> SimulationRequest:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3, help="number of simulated camera sites (default 3)")
    parser.add_argument("--sites-root", type=Path, default=REPO_ROOT / "data" / "synthetic",
                        help="folder with one sub-folder per site; synthetic sites are generated here if missing")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs", help="where run folders go")
    parser.add_argument("--public-root", type=Path, default=REPO_ROOT / "data" / "synthetic-public",
                        help="unlabeled images for server-side KD and clustering; generated here if missing")
    parser.add_argument("--algorithm", default="fedpav", help="conf/algorithm/<name>.yaml")
    parser.add_argument("--profile", default="demo", help="conf/profile/<name>.yaml (demo, test, none)")
    parser.add_argument("--overrides", default="", help='extra Hydra overrides, e.g. "federation.rounds=20"')
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of the run")
    parser.add_argument("--cpus-per-site", type=int, default=1, help="Ray CPUs reserved per simulated site")
    parser.add_argument("--gpus-per-site", type=float, default=0.0, help="Ray GPUs per site, e.g. 0.25 = 4 per GPU")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="run the sites' actors on this running Ray cluster (its head's GCS address, "
                             "from `ray start --head`); every node must see --sites-root at the same path")
    parser.add_argument("--no-generate", action="store_true", help="never generate data; use --sites-root as is")
    parser.add_argument("--federation", default="synthetic", choices=FEDERATIONS,
                        help="which synthetic sites to generate: synthetic (default), synthetic-resdrift (4 sites "
                             "whose cameras differ in resolution; profile resdrift) or synthetic-fedreid9 (nine "
                             "FedReID-shaped sites and two held-out ones; profile fedreid9_synthetic); sites-root "
                             "data/<federation>")
    parser.add_argument("--site-names", nargs="+", default=None, metavar="NAME",
                        help="simulate exactly these folders of --sites-root, in this order (partition i is the "
                             "i-th), e.g. a leave-one-site-out group of synthetic-fedreid9")
    parser.add_argument("--flwr-home", type=Path, default=None,
                        help="Flower's home for this simulation (config, installed app, SuperLink log); default: "
                             "a fresh one under .flwr/runs/, so that simulations side by side never share one")
    args = parser.parse_args(argv)
    fixed_names: tuple[str, ...] = ()
    if args.federation != "synthetic":  # its own folder, all its sites, its profile, unless told otherwise
        given = argv if argv is not None else sys.argv[1:]
        if args.sites_root == REPO_ROOT / "data" / "synthetic":
            args.sites_root = REPO_ROOT / "data" / args.federation
        args.sites = args.sites if "--sites" in given else federation_size(args.federation)
        args.profile = args.profile if "--profile" in given else FEDERATION_PROFILES[args.federation]
        if args.federation == "synthetic-fedreid9":  # partition i is the i-th site, held-out ones last
            fixed_names = tuple(site_names(args.sites, args.seed, args.federation))
    composed = compose_config({"profile": args.profile, "overrides": args.overrides})
    check_backbone(str(composed.model.backbone), str(composed.model.get("backbone_factory") or ""))  # before any work
    benchmark = composed.benchmark
    names = tuple(str(s) for s in benchmark.sites)
    if names:  # a benchmark profile: its prepared datasets, never generated data
        args.sites, args.no_generate = len(names), True
    if args.site_names:
        names = tuple(args.site_names)
        if args.sites_root == REPO_ROOT / "data" / "synthetic" and benchmark.root:
            args.sites_root = Path(str(benchmark.root))
    if not args.no_generate:
        every_site = federation_size(args.federation) or args.sites  # --site-names picks among all of them
        ensure_synthetic_sites(args.sites_root, every_site if args.site_names else args.sites, args.seed,
                               args.federation)
        ensure_public_set(args.public_root, args.seed)
    if args.site_names:
        args.sites = len(names)
    request = SimulationRequest(
        sites=args.sites, sites_root=args.sites_root, output_dir=args.output_dir,
        public_root=args.public_root if args.public_root.is_dir() else None, algorithm=args.algorithm,
        profile=args.profile, overrides=args.overrides, seed=args.seed, cpus_per_site=args.cpus_per_site,
        gpus_per_site=args.gpus_per_site, flwr_home=args.flwr_home.resolve() if args.flwr_home else None,
        site_names=names or fixed_names,
        ray_address=args.ray_address)
    return request


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        request = parse_args(argv)
        folder = run_simulation(request)
    except (SimulationError, FileExistsError, ValueError) as error:
        log.error("%s", error)
        return 1
    print("\n" + (folder / "results.md").read_text())
    print(f"outputs: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
