"""What a site accepts from the server: which submitted apps, and which run-config knobs that
would run code beside its images.

The site worker runs only the fedreid installed on the site's box. It never installs, imports or
runs the code of the app (FAB) that came with a run; it reads the FAB as a zip, only to decide
whether the run is meant for the code the site runs. A task is accepted when

* the run's app is fedreid (``APP_ID``) at the installed version,
* every site-side source file the FAB carries (``SITE_PACKAGES``) is byte for byte the installed
  one, and the FAB names the installed ClientApp, so that a submitter who changed the site's code
  learns that this site would not run it, instead of believing it did;
* when the operator pinned FAB hashes (``fedreid-client --allow-app-hash``), it is one of them.

The FAB is read with bounded memory: entries are decompressed and hashed a chunk at a time,
within a total (64 MB) and a ratio (200:1) that no real app reaches, whatever sizes the zip
declares.

Files only the server runs (``server/``, ``conf/``, ``bench/``, ``tests/``, the README) may differ:
they never run here. A refusal names the app the site runs and why, in the error reply the server
records, and in the site's log.

Knobs that would import code on the site are refused unless its operator allowed them:
``model.backbone_factory=module:function`` only for modules named by ``--allow-module``, and a
``.pkl`` factory (unpickling runs code) never on a deployed site.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from clients.public_errors import PublicError

APP_ID = "fedreid/fedreid"  # [tool.flwr.app] publisher / [project] name, as Flower names a run's app
DISTRIBUTION = "fedreid"
SITE_PACKAGES = ("clients", "reid", "strategies")  # the code that runs beside a site's images
CLIENTAPP = "clients.app:app"
ALLOWED_MODULES_KEY = "allow-modules"  # node_config: the modules --allow-module named, space-separated
MAX_LISTED = 3


class ForbiddenKnob(PublicError, PermissionError):
    """A run-config value would run code on this site that its operator did not allow."""


def installed_version() -> str:
    return importlib.metadata.version(DISTRIBUTION)


def _package_files(package: str) -> dict[str, str]:
    """``{"clients/app.py": sha256, ...}`` of an installed package's Python sources."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the site package {package!r} is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    return {f"{package}/{path.relative_to(root).as_posix()}": hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*.py")) if "__pycache__" not in path.parts}


def installed_site_code() -> dict[str, str]:
    """The sources of every site package as installed on this box, by path, with their sha256."""
    files: dict[str, str] = {}
    for package in SITE_PACKAGES:
        files.update(_package_files(package))
    return files


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:MAX_LISTED])
    return shown + (f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")


@dataclass
class AppPolicy:
    """Decides, per submitted app, whether this site runs the task (see the module's docstring)."""

    site: str
    allowed_hashes: frozenset[str] = frozenset()
    version: str = field(default_factory=installed_version)
    code: dict[str, str] = field(default_factory=installed_site_code)
    _verdicts: dict[tuple[str, str, str], str | None] = field(default_factory=dict)  # checked once per app

    def describe(self) -> str:
        pinned = f", only FAB {', '.join(sorted(h[:12] for h in self.allowed_hashes))}" if self.allowed_hashes else ""
        return f"fedreid {self.version} as installed{pinned}"

    def refusal(self, fab_id: str, fab_version: str, fab_hash: str, fab_content: bytes) -> str | None:
        """None when the task may run; otherwise why not, in words for the server's operator."""
        key = (fab_hash, fab_id, fab_version)
        if key not in self._verdicts:
            reason = self._check(fab_id, fab_version, fab_hash, fab_content)
            self._verdicts[key] = None if reason is None else (
                f"site {self.site!r} refused app {fab_id or '?'} {fab_version or '?'} (FAB {fab_hash[:12]}): "
                f"{reason}. This site runs only {self.describe()}; the submitted app's code never runs here")
        return self._verdicts[key]

    def _check(self, fab_id: str, fab_version: str, fab_hash: str, content: bytes) -> str | None:
        if self.allowed_hashes and fab_hash not in self.allowed_hashes:
            return "its FAB hash is not one the site's operator pinned with --allow-app-hash"
        if fab_id != APP_ID:
            return f"it is not {APP_ID}"
        if fab_version != self.version:
            return f"it is version {fab_version}, the site has {self.version} installed"
        try:
            archive = zipfile.ZipFile(io.BytesIO(content))
            budget = FabBudget(len(archive.infolist()))
            submitted = {name: _streamed_sha256(archive, name, budget) for name in archive.namelist()
                         if name.endswith(".py") and name.split("/", 1)[0] in SITE_PACKAGES}
            project = tomllib.loads(_read_small(archive, "pyproject.toml", budget).decode())
        except OversizedFab as error:
            return f"its FAB is refused unread: {error}"
        except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError, EOFError, OSError) as error:
            return f"its FAB cannot be read ({type(error).__name__})"
        clientapp = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
        if clientapp != CLIENTAPP:
            return f"it names {clientapp!r} as its ClientApp, not {CLIENTAPP}"
        changed = sorted(path for path, digest in submitted.items() if self.code.get(path) != digest)
        if changed:
            return f"its site code differs from the installed one in {_listing(changed)}"
        missing = sorted(set(self.code) - set(submitted))
        if missing:
            return f"it lacks site code the installed fedreid has: {_listing(missing)}"
        return None


MAX_FAB_ENTRIES = 10_000
MAX_FAB_UNCOMPRESSED = 64 * 1024 * 1024  # all entries the check reads, decompressed
MAX_FAB_RATIO = 200  # decompressed : compressed, per entry (source text compresses about 4:1)
CHUNK = 1 << 16


class OversizedFab(ValueError):
    """A FAB whose entries would take more memory or time to read than any real app's."""


class FabBudget:
    """Bytes the check may still decompress; a zip bomb runs out of it after a bounded read."""

    def __init__(self, entries: int) -> None:
        if entries > MAX_FAB_ENTRIES:
            raise OversizedFab(f"{entries} entries, more than {MAX_FAB_ENTRIES}")
        self.left = MAX_FAB_UNCOMPRESSED

    def take(self, count: int, name: str, compressed: int, read: int) -> None:
        self.left -= count
        if self.left < 0:
            raise OversizedFab(f"its entries decompress to more than {MAX_FAB_UNCOMPRESSED >> 20} MB")
        if read > 1 << 20 and read > MAX_FAB_RATIO * max(compressed, 1):
            raise OversizedFab(f"entry {name!r} decompresses more than {MAX_FAB_RATIO}:1")


def _chunks(archive: zipfile.ZipFile, name: str, budget: FabBudget):
    """An entry's bytes, a chunk at a time, counted against ``budget`` as they are decompressed
    (the sizes a zip declares are not trusted)."""
    info = archive.getinfo(name)
    read = 0
    with archive.open(info) as entry:
        while chunk := entry.read(CHUNK):
            read += len(chunk)
            budget.take(len(chunk), name, info.compress_size, read)
            yield chunk


def _streamed_sha256(archive: zipfile.ZipFile, name: str, budget: FabBudget) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(archive, name, budget):
        digest.update(chunk)
    return digest.hexdigest()


def _read_small(archive: zipfile.ZipFile, name: str, budget: FabBudget, limit: int = 1 << 20) -> bytes:
    data = bytearray()
    for chunk in _chunks(archive, name, budget):
        data += chunk
        if len(data) > limit:
            raise OversizedFab(f"{name} is larger than {limit >> 10} KB")
    return bytes(data)


def allowed_modules(node_config: Mapping[str, object]) -> frozenset[str]:
    return frozenset(str(node_config.get(ALLOWED_MODULES_KEY, "") or "").split())


def check_backbone_factory(factory: str, node_config: Mapping[str, object], deployed: bool) -> None:
    """Refuse a ``model.backbone_factory`` this site's operator did not allow (simulations: all)."""
    if not factory or not deployed:
        return
    if factory.endswith(".pkl"):
        raise ForbiddenKnob(f"model.backbone_factory={factory!r}: a pickled factory would run code from a file; a "
                            "deployed site imports only module:function factories its operator allowed "
                            "(fedreid-client --allow-module)")
    from reid.backbones import module_allowed  # torch: only where a run names a factory, never in fedreid-client

    module = factory.partition(":")[0]
    allowed = allowed_modules(node_config)
    if not module_allowed(module, allowed):
        raise ForbiddenKnob(f"model.backbone_factory={factory!r}: this site's operator has not allowed module "
                            f"{module!r} (fedreid-client --allow-module {module.split('.')[0]}); allowed: "
                            f"{', '.join(sorted(allowed)) or 'none'}")
