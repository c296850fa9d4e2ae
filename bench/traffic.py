"""What a run's messages cost on the wire, as the bench tables report it: bytes per round each way,
and their sum against dense fp32 FedPav's."""

from __future__ import annotations


def exchanged_bytes(lines: list[dict]) -> tuple[float, float]:
    """(up, down) bytes per round of the training sites' messages, training and evaluation exchanges,
    averaged over all rounds (held-out sites' evaluations are a measurement, not federation traffic)."""
    rounds = max(1, max(line["round"] for line in lines))
    up = sum((exchange.get("bytes") or {}).get("received", 0) for line in lines
             for exchange in (line.get("train") or {}, line.get("evaluate") or {}))
    down = sum((exchange.get("bytes") or {}).get("sent", 0) for line in lines
               for exchange in (line.get("train") or {}, line.get("evaluate") or {}))
    return up / rounds, down / rounds


def bytes_cell(result: dict, results: list[dict]) -> str:
    """'up / down MB per round (total x dense fp32 FedPav)' for a table row."""
    if result["method"] == "central":
        return "0 (outside Flower)"
    fedpav = next((r for r in results if r["method"] == "fedpav"), None)
    cell = f"{result['upload_mb']:.1f} / {result['download_mb']:.1f}"
    if fedpav:
        total = (result["upload_mb"] + result["download_mb"]) / (fedpav["upload_mb"] + fedpav["download_mb"])
        cell += f" ({total:.2f}x)"
    return cell
