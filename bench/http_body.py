"""What a 5 MiB request body costs Flower's HTTP API, as uvicorn delivers it and in one piece.

    python bench/http_body.py [--requests 30] [--repeats 3]

Flower 1.39's SuperLink serves the Runtime API (the ServerApp pushing a model, 5 MiB per chunk)
through FastAPI behind five Starlette ``BaseHTTPMiddleware`` layers; the SuperNode, which a site
worker pushes its reply to, behind two. uvicorn hands the body over in socket-sized pieces and
every layer passes each piece through its own task and stream; ``server/whole_bodies.py`` reads
the body first and hands it on in one piece. Here one uvicorn server on 127.0.0.1 runs Flower's
own SuperLink app (``flwr.superlink.main.create_app``, in-memory state), plain and with TLS, and
an httpx client (Flower's own client library) posts ``push-object`` requests of 5 MiB; the
request is refused at the task-token check, after the middleware has read and parsed the body,
so what is timed is the transport and the middleware, not the store. Rows side by side, medians
of ``--repeats`` runs of ``--requests`` requests each; a bare FastAPI route reading the body is the
floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from server.whole_bodies import WholeRequestBody  # noqa: E402
from tests.asgi_server import serving  # noqa: E402

BODY_BYTES = 5 * 1024 * 1024  # Flower's chunk size (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


def bare_app() -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    app = FastAPI()

    @app.post("/v1/runtime/push-object")
    async def push(request: Request) -> Response:
        await request.body()
        return Response(content=b"")

    return app


def flower_app(whole: bool) -> Any:
    from flwr.superlink.main import create_app

    app = create_app()
    return WholeRequestBody(app) if whole else app


def self_signed(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def seconds_per_request(app: Any, tls: tuple[Path, Path] | None, body: bytes, requests: int) -> float:
    with serving(app, tls) as base, httpx.Client(verify=str(tls[1]) if tls else False, timeout=60) as client:
        url = f"{base}/v1/runtime/push-object"
        client.post(url, content=body, headers=PROTOBUF)  # connection and first-call costs
        start = time.perf_counter()
        for _ in range(requests):
            client.post(url, content=body, headers=PROTOBUF)
        elapsed = time.perf_counter() - start
    return elapsed / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=E0611

    body = PushObjectRequest(object_id="0" * 64, object_content=os.urandom(BODY_BYTES)).SerializeToString()
    rows = {"bare FastAPI route (floor)": lambda: bare_app(),
            "Flower's SuperLink app, as uvicorn delivers the body": lambda: flower_app(False),
            "Flower's SuperLink app, body in one piece (server/whole_bodies.py)": lambda: flower_app(True)}
    with tempfile.TemporaryDirectory() as scratch:
        tls = self_signed(Path(scratch))
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the box hits every row
            for label, build in rows.items():
                for secure in (False, True):
                    times.setdefault((label, secure), []).append(
                        seconds_per_request(build(), tls if secure else None, body, args.requests))
    print(f"5 MiB push-object requests, {args.requests} per run, medians of {args.repeats} runs (ms per request)")
    print("| app | plain HTTP | TLS | MB/s (TLS) |\n|---|---:|---:|---:|")
    for label in rows:
        plain, secure = (statistics.median(times[(label, s)]) for s in (False, True))
        print(f"| {label} | {plain * 1e3:.1f} | {secure * 1e3:.1f} | {BODY_BYTES / secure / 1e6:.0f} |")


if __name__ == "__main__":
    main()
