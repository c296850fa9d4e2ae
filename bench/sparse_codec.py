"""Benchmark: the sparse codec on a ResNet-50 backbone's SHARED tensors, and mask-aware aggregation.

Per pruning ratio (magnitude pruning of every conv/linear weight, as the sites do):
  * encoded bytes / dense fp32 bytes, for the whole SHARED state as it travels (pruned tensors
    encoded, biases and BatchNorm dense), with fp32 and fp16 values, plus the Flower wire size;
  * encoded bytes / information bound (mask entropy n.H(p) bits + kept values' bytes, dense rest);
  * encode and decode time.
Then a 9-site mask-aware aggregation next to a plain dense NumPy weighted average of the same
arrays, measured alternately in this run.

    python bench/sparse_codec.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from reid.models import ModelSpec, build_model, shared_state  # noqa: E402
from strategies.averaging import masked_weighted_average, normalise_weights, weighted_average  # noqa: E402
from strategies.sparse_codec import support_bound_bytes  # noqa: E402
from strategies.pruning_plan import magnitude_mask, prunable_keys  # noqa: E402
from strategies.sparse_records import Tensor, decode_record, encode_record  # noqa: E402
from strategies.update_codec import CompressionSpec, decode_record_change, encode_record_change  # noqa: E402
from strategies.wire import message_wire_bytes  # noqa: E402

RATIOS = (0.3, 0.4, 0.5, 0.7, 0.9)


def resnet50_shared(seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.numpy() for k, v in shared_state(build_model(ModelSpec(backbone="resnet50")), "local").items()}


def pruned(state: dict[str, np.ndarray], ratio: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    masks = {k: magnitude_mask(state[k], ratio) for k in prunable_keys(state)}
    return {k: np.where(masks[k], v, 0).astype(np.float32) if k in masks else v for k, v in state.items()}, masks


def wire_bytes(record: ArrayRecord) -> int:
    """Serialised size of a reply carrying just this record (Flower's own object encoding)."""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    return message_wire_bytes(Message(content=RecordDict({"arrays": record, "c": ConfigRecord()}), dst_node_id=1,
                                      message_type="train"))


def codec_table(state: dict[str, np.ndarray]) -> None:
    dense = sum(v.nbytes for v in state.values())
    dense_wire = wire_bytes(ArrayRecord({k: Array(v) for k, v in state.items()}))
    shapes = {k: v.shape for k, v in state.items()}
    print(f"ResNet-50 SHARED state: {sum(v.size for v in state.values()) / 1e6:.2f} M values, "
          f"{dense / 1e6:.1f} MB dense fp32 ({dense_wire / 1e6:.1f} MB on the wire)")
    print("ratio | values | encoded/dense | wire/dense wire | encoded/bound | encode s | decode s")
    for ratio in RATIOS:
        values, masks = pruned(state, ratio)
        for dtype, width in (("float32", 4), ("float16", 2)):
            start = time.perf_counter()
            record = encode_record(values, masks, dtype)
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            decoded = decode_record(record, shapes)
            decode_s = time.perf_counter() - start
            encoded = sum(a.numpy().nbytes for a in record.values())
            bound = sum(support_bound_bytes(m.size, int(m.sum())) + int(m.sum()) * width for m in masks.values())
            bound += sum(v.nbytes for k, v in values.items() if k not in masks)
            exact = all(np.array_equal(decoded[k].values, values[k]) for k in values) if dtype == "float32" else True
            print(f" {ratio:.1f}  | {dtype} | {encoded / dense:.4f} | {wire_bytes(record) / dense_wire:.4f} "
                  f"| {encoded / bound:.4f} | {encode_s:.2f} | {decode_s:.2f}{'' if exact else '  NOT EXACT'}")


def dense_average(updates: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    """The plain dense weighted average, written the fast way (float32, in place, no temporaries)."""
    w = normalise_weights(weights).astype(np.float32)
    out = {}
    for key, first in updates[0].items():
        total, scratch = np.zeros_like(first), np.empty_like(first)
        for weight, update in zip(w, updates):
            np.multiply(update[key], weight, out=scratch)
            total += scratch
        out[key] = total
    return out


def aggregation_timing(state: dict[str, np.ndarray], sites: int = 9, ratio: float = 0.5, repeats: int = 3) -> None:
    rng = np.random.default_rng(0)
    uploads, plain = [], []
    for _ in range(sites):  # every site prunes its own perturbed copy: different masks
        noisy = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in state.items()}
        values, masks = pruned(noisy, ratio)
        uploads.append({k: Tensor(v, masks.get(k)) for k, v in values.items()})
        plain.append(values)
    weights = rng.uniform(1, 3, sites)
    times: dict[str, list[float]] = {"masked": [], "plain": [], "blocked": []}
    for _ in range(repeats):  # alternate, so all three see the same machine state
        for name, run in (("masked", lambda: masked_weighted_average(uploads, weights)),
                          ("plain", lambda: dense_average(plain, weights)),
                          ("blocked", lambda: weighted_average(plain, weights))):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    print(f"\n{sites}-site aggregation at pruning {ratio} (decoded arrays, best of {repeats}):")
    print(f"  mask-aware average (product code)           : {best['masked']:.2f} s")
    print(f"  plain dense NumPy average                   : {best['plain']:.2f} s"
          f"  -> mask-aware / plain   = {best['masked'] / best['plain']:.2f}x (target <= 2x)")
    print(f"  dense average, same blocked code as product : {best['blocked']:.2f} s"
          f"  -> mask-aware / blocked = {best['masked'] / best['blocked']:.2f}x")


def change_table(state: dict[str, np.ndarray]) -> None:
    """Compressed changes (strategies/update_codec.py) of a ResNet-50 round update: bytes against the
    dense fp32 state, the error it leaves (relative L2 of the change; error feedback sends it later)
    and the time both ways, one row per setting."""
    rng = np.random.default_rng(1)
    change = {k: (rng.standard_t(3, v.shape) * 1e-3).astype(np.float32) for k, v in state.items()}
    target = {k: v + change[k] for k, v in state.items()}
    dense = sum(v.nbytes for v in state.values())
    shapes = {k: v.shape for k, v in state.items()}
    norm = np.sqrt(sum(float((c.astype(np.float64) ** 2).sum()) for c in change.values()))
    print("\ncompressed change of a ResNet-50 round update (heavy-tailed, 1e-3 scale), against dense fp32:")
    print("bits | top-k | block | bytes/dense | wire/dense wire | relative L2 error | encode s | decode s")
    dense_wire = wire_bytes(ArrayRecord({k: Array(v) for k, v in state.items()}))
    for bits, topk in ((8, 0.0), (4, 0.0), (2, 0.0), (8, 0.1), (4, 0.1), (4, 0.01)):
        spec = CompressionSpec(enabled=True, bits=bits, topk=topk)
        start = time.perf_counter()
        encoded = encode_record_change(target, state, spec)
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        decoded = decode_record_change(encoded.record, state, shapes)
        decode_s = time.perf_counter() - start
        size = sum(a.numpy().nbytes for a in encoded.record.values())
        error = np.sqrt(sum(float(((decoded[k].values - target[k]).astype(np.float64) ** 2).sum()) for k in state))
        print(f"  {bits}  | {topk:5.2f} | {spec.block} | {size / dense:.4f} | {wire_bytes(encoded.record) / dense_wire:.4f}"
              f" | {error / norm:.4f} | {encode_s:.2f} | {decode_s:.2f}")


def main() -> None:
    state = resnet50_shared()
    codec_table(state)
    change_table(state)
    aggregation_timing(state)


if __name__ == "__main__":
    main()
