"""`fedreid-certs`: the deployment's TLS certificates and the sites' authentication keys.

    fedreid-certs create certs/ --san server.example.org --san 10.0.0.5 --site mall --site station --site campus
    fedreid-certs register certs/ --superlink server.example.org:9093
    fedreid-certs export certs/ --role site:mall --out mall-certs/


`create` writes, with the `cryptography` library (no openssl command lines):

    certs/ca.crt, ca.key             a private CA (EC P-384), valid 10 years
    certs/server.pem, server.key     the SuperLink's certificate for the SANs given (DNS names or IPs)
    certs/sites/<site>, <site>.pub   one SuperNode authentication key pair per site (EC P-384, OpenSSH format)

Existing files are kept, so adding a site later reuses the CA and the server certificate; `--force`
re-creates everything. Private keys are written with mode 0600. Copy `ca.crt` and `sites/<site>` (the
private key) to the site's box; nothing else leaves the server.

`export` copies what one role needs, and nothing more, into a folder of the same layout (what a
container of that role mounts): `server` (ca.crt, server.pem, server.key), `public` (ca.crt and the
sites' public keys: enough to register them and to submit runs) and `site:<name>` (ca.crt and that
site's key pair). The CA's private key is never exported.

`register` adds the sites' public keys to a running SuperLink (the Control API request that
`flwr supernode register` sends, TLS-verified with ca.crt). A SuperLink started by
`fedreid-server` refuses any SuperNode whose key is not registered.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.control_api import ControlApi

log = logging.getLogger("fedreid.certs")

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class CertPaths:
    """Where `create` writes each file inside one folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def site_key(self, site: str) -> Path:
        return self.root / "sites" / site

    def site_public_key(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.pub"

    def sites(self) -> list[str]:
        """Sites with a public key in this folder, sorted."""
        return sorted(p.stem for p in (self.root / "sites").glob("*.pub"))


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedreid"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(sans: list[str]) -> x509.SubjectAlternativeName:
    """DNS names and IP addresses, told apart by whether they parse as an IP."""
    entries: list[x509.GeneralName] = []
    for san in sans:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            entries.append(x509.DNSName(san))
    return x509.SubjectAlternativeName(entries)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY))


def create_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedreid CA")
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    _write_private(paths.ca_key, _pem_key(key))
    paths.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def load_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{paths.ca_key} is not an EC private key")
    return cert, key


CertificateAuthority = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def create_server_cert(paths: CertPaths, sans: list[str], ca: CertificateAuthority) -> None:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name(sans[0]), ca_cert.subject, key.public_key())
            .add_extension(_subject_alt_names(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(paths.server_key, _pem_key(key))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def create_site_key(paths: CertPaths, site: str) -> None:
    """An EC P-384 key pair in OpenSSH format, the form `flower-supernode` and `flwr supernode register` read."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(paths.site_key(site), private)
    paths.site_public_key(site).write_bytes(public + f" fedreid-{site}\n".encode())


def server_cert_sans(paths: CertPaths) -> list[str]:
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in names.get_values_for_type(x509.DNSName) + names.get_values_for_type(x509.IPAddress)]


def create(root: Path, sans: list[str], sites: list[str], force: bool = False) -> list[Path]:
    """Create what is missing (everything with `force`); return the files written."""
    for site in sites:
        if not SITE_NAME.match(site):
            raise ValueError(f"site name {site!r}: use letters, digits, '.', '_' or '-'")
    paths = CertPaths(root)
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if force or not (paths.ca_cert.exists() and paths.ca_key.exists()):
        ca = create_ca(paths)
        written += [paths.ca_cert, paths.ca_key]
        force = True  # a new CA invalidates the old server certificate
    else:
        ca = load_ca(paths)
    if force or not paths.server_cert.exists():
        if not sans:
            raise ValueError("the server certificate needs at least one --san (the name or IP sites connect to)")
        create_server_cert(paths, sans, ca)
        written += [paths.server_cert, paths.server_key]
    elif sans and sorted(sans) != sorted(server_cert_sans(paths)):
        raise ValueError(f"{paths.server_cert} exists for SANs {server_cert_sans(paths)}, not {sans}; "
                         f"use --force to re-create all certificates")
    for site in sites:
        if force or not paths.site_key(site).exists():
            create_site_key(paths, site)
            written += [paths.site_key(site), paths.site_public_key(site)]
    return written


def register(root: Path, superlink: str, sites: list[str] | None = None) -> dict[str, str]:
    """Register the sites' public keys with the SuperLink's Control API; return site -> result."""
    paths = CertPaths(root)
    chosen = sites or paths.sites()
    if not chosen:
        raise ValueError(f"no site keys under {root / 'sites'}; run `fedreid-certs create` first")
    results: dict[str, str] = {}
    control = ControlApi(superlink, paths.ca_cert)
    try:
        for site in chosen:
            public = paths.site_public_key(site)
            if not public.exists():
                raise FileNotFoundError(f"{public} does not exist; run `fedreid-certs create {root} --site {site}`")
            results[site] = control.register(public, site)
            log.info("site %s: %s", site, results[site])
    finally:
        control.close()
    return results


ROLES = ("server", "public", "site:<name>")


def role_files(paths: CertPaths, role: str) -> list[Path]:
    """The files of ``paths`` that a container of ``role`` needs (see the module docstring)."""
    if role == "server":
        return [paths.ca_cert, paths.server_cert, paths.server_key]
    if role == "public":
        return [paths.ca_cert, *(paths.site_public_key(site) for site in paths.sites())]
    kind, _, site = role.partition(":")
    if kind == "site" and SITE_NAME.match(site):
        return [paths.ca_cert, paths.site_key(site), paths.site_public_key(site)]
    raise ValueError(f"role {role!r}: use one of {', '.join(ROLES)}")


def export(root: Path, role: str, out: Path) -> list[Path]:
    """Copy ``role``'s files from ``root`` to ``out`` (same layout, same modes); return the copies."""
    source, target = CertPaths(root), CertPaths(out)
    written: list[Path] = []
    for path in role_files(source, role):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run `fedreid-certs create {root} ...` first")
        copy = target.root / path.relative_to(source.root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077 == 0:  # a private key stays private in its copy
            _write_private(copy, path.read_bytes())
        else:
            copy.write_bytes(path.read_bytes())
        written.append(copy)
    return written


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("create", help="CA, server certificate and site keys (missing ones only)")
    make.add_argument("folder", type=Path)
    make.add_argument("--san", action="append", default=[], help="DNS name or IP of the server (repeatable)")
    make.add_argument("--site", action="append", default=[], help="site name (repeatable)")
    make.add_argument("--force", action="store_true", help="re-create everything, including the CA")
    enrol = commands.add_parser("register", help="register the sites' public keys with a running SuperLink")
    enrol.add_argument("folder", type=Path)
    enrol.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink's Control API")
    enrol.add_argument("--site", action="append", default=None, help="only these sites (default: all)")
    copy = commands.add_parser("export", help="copy one role's files (server, public, site:<name>) to a folder")
    copy.add_argument("folder", type=Path)
    copy.add_argument("--role", required=True, help="server, public or site:<name>")
    copy.add_argument("--out", type=Path, required=True, help="the folder to copy into (same layout)")
    args = parser.parse_args(argv)
    try:
        if args.command in ("create", "export"):
            made = (create(args.folder, args.san, args.site, args.force) if args.command == "create"
                    else export(args.folder, args.role, args.out))
            for path in made:
                print(f"wrote {path}")
            return 0
        results = register(args.folder, args.superlink, args.site)
    except (OSError, ValueError) as error:
        log.error("%s", error)
        return 1
    for site, result in results.items():
        print(f"{site}: {result}")
    return 0 if all(r.startswith(("registered", "already registered")) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
