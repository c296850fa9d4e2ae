"""`fedreid-client`: one line to join a camera site to the federation from its edge box.

    fedreid-client --server fl.example.org:9092 --dataset mall --data-root /data/mall \\
        --ca certs/ca.crt --key certs/sites/mall [--gpu 0]

It first checks the site's data layout (and fails with the path and the expected layout if it is
wrong, before any connection is made), then runs and watches two processes:

* Flower's `flower-supernode --isolation process`, whose `node_config` carries the site's dataset
  name, data root, GPU and state folder, and whose Runtime API listens on this box only. TLS
  (verified against `--ca`) and SuperNode authentication (`--key`, the site's private key from
  `fedreid-certs create`) are on unless `--insecure` (local trials only).
* the site worker (clients/worker.py), the SuperNode's executor: it takes every task and runs the
  fedreid installed here on it, never the code of the app the server submitted, and refuses apps
  that are not that fedreid (clients/trust.py). Only these two share the SuperExec secret
  (`<state-dir>/superexec.secret`, new at every start) that taking a task needs.

A worker that dies is started again at once (the task it died in is answered as failed, so the
server names the site in that round), as is one stopped for its task's time budget; a SuperNode
whose receiving loop ended is started again with a backoff; when the SuperNode ends otherwise,
the worker is stopped and `fedreid-client` exits with the SuperNode's exit code. The site's
limits (clients/policy.py) are flags here and reach the worker on its command line. Everything
runs with umask 077 and the state folder is 0700. `--run-submitted-app` gives Flower's own
behaviour instead: a process per message that runs the submitted app's code (a warning says so).

The state folder (default `./fedreid-state/<dataset>`) keeps what must survive a restart of the
box: the site's classifier head, BatchNorm statistics, pruning masks and clusters (written after
every round), its decoded images, and Flower's own home.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from clients.answer_on_death import AnswerOnDeath
from clients.location import IMAGES_PER_IDENTITY
from clients.policy import SitePolicy
from clients.supernode import DEFAULT_POLL_S, EXIT_LOOP_ENDED, MIN_POLL_S
from clients.trust import ALLOWED_MODULES_KEY
from server.flower_cli import with_flower_tuning

log = logging.getLogger("fedreid.client")


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
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S,
                        help=f"seconds between an idle SuperNode's asks for a message, its ask's own time included "
                             f"(default {DEFAULT_POLL_S}, at least {MIN_POLL_S}; Flower's own is 3 s). fedreid-server "
                             "holds each ask until a message comes, up to 3 s, so this paces only a SuperLink that "
                             "answers at once")
    parser.add_argument("--max-wait-time", type=float, default=None,
                        help="give up after this many seconds without the SuperLink (default: retry forever)")
    parser.add_argument("--synthetic-site", type=int, default=None, metavar="INDEX",
                        help="demo boxes: if --data-root holds no images yet, first generate synthetic camera "
                             "site INDEX there (a folder with real images is never touched)")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="CPU threads for this site's training (default: every core); set it when several "
                             "sites or other services share the box, or they slow each other down")
    parser.add_argument("--allow-app-hash", action="append", default=[], metavar="SHA256",
                        help="accept only runs whose app (FAB) has this sha256 (repeatable): `sha256sum` of the .fab "
                             "that `flwr build` writes (the build is reproducible); by default any FAB whose site "
                             "code equals the fedreid installed here")
    parser.add_argument("--allow-module", action="append", default=[], metavar="NAME",
                        help="let runs use model.backbone_factory=NAME.module:function (repeatable); the module "
                             "must be installed on this box. By default no run may import code here")
    parser.add_argument("--run-submitted-app", action="store_true",
                        help="UNSAFE: let Flower run the app the server submitted, in a new process per message, "
                             "instead of the fedreid installed here; that code reads this site's images")
    parser.add_argument("--images-per-identity", type=float, default=None,
                        help="FedUReID sites: this site's own estimate of images per person, from which it plans "
                             "its clustering (default: the run's algorithm.unsupervised.images_per_identity)")
    parser.add_argument("--check-only", action="store_true", help="check the data layout and the key files, then exit")
    SitePolicy.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.poll_interval < MIN_POLL_S:
        parser.error(f"--poll-interval {args.poll_interval} is below {MIN_POLL_S} s")
    if args.run_submitted_app and args.allow_app_hash:
        parser.error("--allow-app-hash cannot be enforced with --run-submitted-app: Flower installs and runs whatever "
                     "app the server sends. Drop --run-submitted-app (the site worker enforces the pin)")
    try:
        SitePolicy.from_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


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
    from reid.data.synthetic import generate_site

    generate_site(root, index, seed=0, overwrite=True)
    marker.unlink()
    return True


def check_site(args: argparse.Namespace) -> str:
    """The data layout and the TLS files, checked before connecting; raise with what is wrong."""
    from reid.data.dataset import load_reid_data
    from reid.data.layout import DatasetLayoutError

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


SECRET_FILE = "superexec.secret"
PR_SET_PDEATHSIG = 1
POLL_S = 0.2
STOP_WAIT_S = 15.0
OVERDUE_GRACE_S = 30.0  # a worker that has not stopped its own over-budget task this long after is killed
SUPERNODE_BACKOFF_S = (1.0, 30.0)  # restarts of a SuperNode whose receiving loop ended: first wait, longest
SUPERNODE_STABLE_S = 60.0  # a SuperNode up this long has its restart backoff reset


def supernode_command(args: argparse.Namespace, state_dir: Path, secret: Path | None) -> list[str]:
    """Flower's SuperNode for this site, its idle wait set by ``--poll-interval`` (clients/supernode.py);
    with ``secret``, in process isolation (our worker executes)."""
    root = args.data_root.expanduser().resolve()
    node_config = f'dataset="{args.dataset}" data-root="{root}" state-dir="{state_dir}"'
    if args.gpu is not None:
        node_config += f" gpu={args.gpu}"
    if args.images_per_identity is not None:
        node_config += f" {IMAGES_PER_IDENTITY}={float(args.images_per_identity)}"
    if args.allow_module:
        node_config += f' {ALLOWED_MODULES_KEY}="{" ".join(args.allow_module)}"'
    command = [sys.executable, "-m", "clients.supernode", "--poll-interval", str(args.poll_interval),
               "--superlink", args.server, "--node-config", node_config,
               "--host", "127.0.0.1", "--port", str(args.runtime_port)]
    if secret is not None:
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    if args.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(args.ca.resolve()),
                    "--auth-supernode-private-key", str(args.key.resolve())]
    if args.max_wait_time is not None:
        command += ["--max-wait-time", str(args.max_wait_time)]
    return command


def worker_command(args: argparse.Namespace, state_dir: Path, secret: Path) -> list[str]:
    """The site worker, told by its command line (not by the SuperNode) where the site's data and
    state are, what it may import and its limits."""
    command = [sys.executable, "-m", "clients.worker", "--runtime-api", f"127.0.0.1:{args.runtime_port}",
               "--secret-file", str(secret), "--state-dir", str(state_dir), "--site", args.dataset,
               "--data-root", str(args.data_root.expanduser().resolve()), "--parent-pid", str(os.getpid()),
               *SitePolicy.from_args(args).arguments()]
    if args.gpu is not None:
        command += ["--gpu", str(args.gpu)]
    if args.images_per_identity is not None:
        command += ["--images-per-identity", str(float(args.images_per_identity))]
    for module in args.allow_module:
        command += ["--allow-module", module]
    for digest in args.allow_app_hash:
        command += ["--allow-app-hash", digest]
    return command


def private_state_dir(path: Path) -> Path:
    """The state folder, created 0700 (decoded images, models and keys live there); a folder that
    other users could enter is tightened, and said so."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(mode & 0o700)
        log.warning("the state folder %s was open to other users (mode %o); it is now %o", path, mode, mode & 0o700)
    return path


def write_secret(state_dir: Path) -> Path:
    """A fresh SuperExec secret, readable by this user only: whoever holds it can take the site's tasks."""
    path = state_dir / SECRET_FILE
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when fedreid-client dies, however it dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the worker still watches its parent
        pass


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A child in a process group of its own, so that a stop signal reaches it once, from us (a
    SuperNode signalled twice quits before it signs off at the SuperLink, which then refuses the
    box's next start until its old session times out); it still gets SIGTERM if we are killed."""
    return subprocess.Popen(command, env=env, start_new_session=True,  # noqa: S603 - logs: they inherit ours
                            preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads here yet


def _stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_WAIT_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def should_restart_supernode(code: int) -> bool:
    """Whether a SuperNode that exited with ``code`` is started again: its receiving loop ended
    (clients/supernode.py's EXIT_LOOP_ENDED) or it was killed by a signal it did not ask for; a
    SuperNode that ends by itself otherwise (refused key, --max-wait-time) ends fedreid-client."""
    return code == EXIT_LOOP_ENDED or code < 0


class SiteProcesses:
    """The SuperNode and the site worker of one site, each started again when it should be."""

    def __init__(self, args: argparse.Namespace, state_dir: Path, env: dict[str, str]) -> None:
        self.args, self.state_dir, self.env = args, state_dir, env
        self.secret = write_secret(state_dir)
        self.command = supernode_command(args, state_dir, self.secret)
        self.in_progress = AnswerOnDeath(state_dir)
        self.worker_restarts, self.supernode_restarts = 0, 0
        log.info("starting %s", " ".join(self.command))
        self.supernode, self.supernode_started = spawn(self.command, env), time.monotonic()
        self.worker = self._start_worker()

    def _start_worker(self) -> subprocess.Popen[bytes]:
        return spawn(worker_command(self.args, self.state_dir, self.secret), self.env)

    def restart_supernode(self) -> None:
        _stop(self.supernode)
        self.supernode, self.supernode_started = spawn(self.command, self.env), time.monotonic()

    def check(self) -> int | None:
        """One look at both processes; the SuperNode's exit code when the site should stop."""
        code = self.supernode.poll()
        if code is not None:
            if not should_restart_supernode(code):
                log.info("the SuperNode exited with code %d", code)
                return code
            if time.monotonic() - self.supernode_started > SUPERNODE_STABLE_S:
                self.supernode_restarts = 0
            wait = min(SUPERNODE_BACKOFF_S[0] * 2 ** self.supernode_restarts, SUPERNODE_BACKOFF_S[1])
            self.supernode_restarts += 1
            log.warning("the SuperNode stopped receiving (exit code %d); starting it again in %.0f s (restart %d)",
                        code, wait, self.supernode_restarts)
            time.sleep(wait)
            self.restart_supernode()
        if self.worker.poll() is not None:
            self.worker_restarts += 1
            log.warning("the site worker (pid %d) exited with code %d; starting it again (restart %d)",
                        self.worker.pid, self.worker.returncode, self.worker_restarts)
            if self.in_progress.phase() == AnswerOnDeath.REPLYING:
                log.warning("it died while handing its reply to the SuperNode, which would wait for the rest "
                            "of it for ever; restarting the SuperNode too (the site's state is on its disk)")
                self.restart_supernode()
            self.worker = self._start_worker()
        elif self.in_progress.overdue(time.time(), OVERDUE_GRACE_S):
            log.error("the site worker (pid %d) did not stop its task at the site's time budget "
                      "(--max-task-seconds); killing it", self.worker.pid)
            self.in_progress.mark_over_budget()
            self.worker.kill()
        return None

    def stop(self) -> None:
        _stop(self.worker, self.supernode)


def supervise(args: argparse.Namespace, state_dir: Path, env: dict[str, str]) -> int:
    """Run the SuperNode and the site worker; restart the worker whenever it dies, and the SuperNode
    when its receiving loop ends; return the SuperNode's exit code once it ends for good (or 0 on
    SIGTERM / Ctrl-C)."""
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    site = SiteProcesses(args, state_dir, env)
    try:
        while not stopping:
            code = site.check()
            if code is not None:
                return code
            time.sleep(POLL_S)
        log.info("stopping the site (signal %d)", stopping[0])
        return 0
    finally:
        site.stop()


def run_checks(args: argparse.Namespace) -> int:
    """Generate the synthetic site if asked, then check the layout and key files; 0 when all is well."""
    from reid.data.layout import DatasetLayoutError

    if args.synthetic_site is not None:
        ensure_synthetic_site(args.data_root.expanduser().resolve(), args.synthetic_site)
    try:
        summary = check_site(args)
    except (DatasetLayoutError, OSError, ValueError) as error:
        log.error("cannot start site %s: %s", args.dataset, error)
        return 2
    log.info("data ok: %s", summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    os.umask(0o077)  # everything the site writes (decoded images, models, state) is its user's alone
    args = parse_args(argv)
    if args.check_only or args.run_submitted_app:  # this process ends there, or becomes the SuperNode
        code = run_checks(args)
        if code or args.check_only:
            return code
    else:  # in a child: the supervising process stays small (no torch) for as long as the site runs
        code = subprocess.call([sys.executable, "-m", "clients.launch", *argv, "--check-only"])
        if code:
            return code
    if args.insecure:
        log.warning("--insecure: no TLS and no authentication; use this for local trials only")
    state_dir = private_state_dir((args.state_dir or Path("fedreid-state") / args.dataset).expanduser().resolve())
    env = dict(os.environ)
    env.setdefault("FLWR_HOME", str(state_dir / "flwr-home"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if args.cpu_threads is not None:  # read by torch (OpenMP, MKL) when the worker imports it
        env.update({"OMP_NUM_THREADS": str(args.cpu_threads), "MKL_NUM_THREADS": str(args.cpu_threads)})
    with_flower_tuning(env)  # Flower's polls and transfer sizes; an operator's own setting wins
    if not args.run_submitted_app:
        return supervise(args, state_dir, env)
    log.warning("--run-submitted-app: Flower will install and run, once per message, the code of whatever app the "
                "server submits, beside this site's images; nothing on this site limits what that code reads or "
                "sends. Use it only with a server you trust")
    command = supernode_command(args, state_dir, None)
    log.info("starting %s", " ".join(command))
    sys.stdout.flush()
    os.execvpe(command[0], command, env)  # the SuperNode takes over this process (signals, exit code)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
