"""Compare every FedReID preset with the `local` and `central` baselines on the same synthetic sites.

Same sites, seed, rounds and local epochs for all. Federated presets and `local` run through
`fedreid-sim` (real Flower simulations); `central` trains one model on the union of all sites'
training images with the same training code, outside Flower, and is evaluated on each site's own
query/gallery at the same rounds. Writes a Markdown table (per-site Rank-1/mAP, means, upload bytes
per round) and a PNG of mean mAP over rounds per method.

    python bench/compare_algorithms.py                      # demo profile: 20 rounds, 3 sites, seed 0
    python bench/compare_algorithms.py --seeds 0 1 2        # three training seeds, averaged
    python bench/compare_algorithms.py --methods fedpav local central
    python bench/compare_algorithms.py --unsupervised --seeds 0 1 2   # FedUReID vs its baselines and FedPav

With ``--unsupervised`` the table is FedUReID's: mAP and Rank-1, cluster purity against the hidden
identities (pairwise F and NMI, mean over sites after the last round) and the computation spent
(training image passes, forward + backward, and clustering feature passes, forward only, summed
over sites and rounds); written to compare_unsupervised.md/.png.

With ``--federation synthetic-resdrift`` (four sites whose cameras differ in resolution, profile
``resdrift``: every evaluation also with the queries at ½ and ¼ resolution) the table is the
resolution-drift one: native and ¼-resolution mAP per site, the drift gap (native minus ¼), and
the training cost per round (image passes, summed over the sites; seconds side by side in
bench/raf_cost.py, since runs of this bench do not share a machine's load); written to
compare_resdrift.md/.png. Default methods: fedpav, fedpav_raf,
fedpav_multires_aug, local.

Results of each (method, seed) are saved under bench/results/runs/ and reused by later runs
(``--rerun`` to recompute).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from reid.data.dataset import load_reid_data  # noqa: E402
from reid.data.federations import FEDERATIONS, federation_size  # noqa: E402
from reid.data.tensor_cache import LabelledImages, training_images  # noqa: E402
from reid.device import pick_device  # noqa: E402
from reid.data.tensor_cache import load_images  # noqa: E402
from reid.evaluate import evaluate_at_scales, evaluate_model  # noqa: E402
from reid.features import adapt_batchnorm  # noqa: E402
from reid.models import ModelSpec, build_model, load_shared_state, shared_state  # noqa: E402
from reid.seeding import stable_seed  # noqa: E402
from reid.train import train_local  # noqa: E402
from server import simulate  # noqa: E402
from strategies.held_out import unseen_results  # noqa: E402
from strategies.validation import SOURCE_ONLY, TARGET_ADAPTED  # noqa: E402
from server.config import compose_config, federation_settings, site_run_spec  # noqa: E402
from server.outputs import markdown_table  # noqa: E402
import fedreid9_tables  # noqa: E402  (bench/, next to this file)
from traffic import bytes_cell, exchanged_bytes  # noqa: E402

METHODS = ["fedpav", "fedpav_cdw", "fedpav_kd", "fedpav_cdw_kd", "fedpav_cluster", "local", "central",
           "fedklpr", "fedklpr_fp16", "fedklpr_no_kll", "fedklpr_no_klaw", "fedklpr_no_praw", "fedklpr_no_pruning",
           "fedklpr_no_crr", "fedureid", "fedureid_no_personalization", "local_unsupervised"]
UNSUPERVISED_METHODS = ["fedureid", "fedureid_no_personalization", "local_unsupervised", "fedpav"]
RESDRIFT_METHODS = ["fedpav", "fedpav_raf", "fedpav_multires_aug", "local"]
METHODS += ["fedpav_raf", "fedpav_multires_aug", "feddg", "feddg_no_share", "feddg_no_tone", "feddg_bn_mixed",
            "fedpav_compressed", "fedklpr_compressed"]
LOWEST_SCALE = "0.25"


def run_federated(method: str, seed: int, args: argparse.Namespace, out: Path) -> list[dict]:
    """One fedreid-sim run; returns its metrics.jsonl lines. With ``args.held_out_site`` (the
    leave-one-site-out mode) only ``args.group`` is simulated and that one site of it is held out."""
    run_dir = args.runs / labelled(method, args) / f"seed{seed}"
    argv = ["--federation", args.federation, "--algorithm", method, "--profile", args.profile, "--seed", str(seed), "--sites", str(args.sites),
            "--sites-root", str(args.sites_root), "--public-root", str(args.public_root),
            "--output-dir", str(run_dir)]  # a Flower home of its own: bench runs can go side by side
    overrides = args.overrides
    if getattr(args, "held_out_site", None):
        argv += ["--site-names", *args.group]
        overrides = (f"federation.held_out=[{args.held_out_site}] federation.min_sites={len(args.group) - 1} "
                     f"{overrides}").strip()
    if overrides:
        argv += ["--overrides", overrides]
    if simulate.main(argv) != 0:
        raise RuntimeError(f"{method} failed; see the log above")
    folder = sorted(run_dir.iterdir())[-1]
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def labelled(method: str, args: argparse.Namespace) -> str:
    """The name results of ``method`` are kept and shown under: ``method+tag`` with ``--tag``."""
    tag = getattr(args, "tag", "")
    return f"{method}+{tag}" if tag else method


def cached_run(method: str, seed: int, args: argparse.Namespace) -> list[dict]:
    """The metrics lines of (method, seed), run now unless an earlier run of this bench saved them."""
    cache = args.runs / labelled(method, args) / f"seed{seed}.jsonl"
    if cache.exists() and not args.rerun:
        return [json.loads(line) for line in cache.read_text().splitlines()]
    lines = run_central(args, seed) if method == "central" else run_federated(method, seed, args, args.out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def run_central(args: argparse.Namespace, seed: int) -> list[dict]:
    """One model on the union of all sites' training images, evaluated per site at the eval rounds."""
    cfg = compose_config({"profile": args.profile, "overrides": f"seed={seed} {args.overrides}"})
    spec, settings = site_run_spec(cfg), federation_settings(cfg)
    device = pick_device()
    sites = [load_reid_data(p) for p in sorted(args.sites_root.iterdir()) if p.is_dir()][: args.sites]
    labels = {(d.name, pid): i for i, (d, pid) in enumerate((d, pid) for d in sites for pid in d.train_pids)}
    parts = [training_images(d, spec.model.height, spec.model.width) for d in sites]
    union = LabelledImages(torch.cat([p.images for p in parts]),
                           torch.tensor([labels[(d.name, s.pid)] for d in sites for s in d.train]))
    torch.manual_seed(spec.seed)
    start_state = shared_state(build_model(spec.model), spec.bn_stats)  # the federated runs' initial model
    model = build_model(spec.model, num_classes=len(labels))
    load_shared_state(model, {k: v.clone() for k, v in start_state.items()}, spec.bn_stats)
    lines = []
    for server_round in range(1, settings.rounds + 1):
        stats = train_local(model, union, spec.train, device, seed=stable_seed(spec.seed, "central", server_round),
                            augment=spec.augment)
        line: dict = {"round": server_round, "train": {"bytes": {"received": 0}}, "evaluate": None}
        if settings.evaluates_after(server_round):
            per_site = {}
            for data in sites:
                result = evaluate_model(model, data, device, spec.eval_batch_size)
                per_site[data.name] = {"rank1": result.rank(1), "mAP": result.mAP}
            mean = {k: sum(m[k] for m in per_site.values()) / len(per_site) for k in ("rank1", "mAP")}
            line["evaluate"] = {"sites": per_site, "mean": mean}
            print(f"central round {server_round}: loss {stats.loss:.3f}, mean mAP {100 * mean['mAP']:.1f}", flush=True)
        lines.append(line)
    return lines


def summarise(method: str, runs: list[list[dict]]) -> dict:
    """Final per-site and mean Rank-1/mAP, averaged over seeds, with the spread of the mean mAP."""
    finals, last3, uploads, last_uploads, curves, purity, passes, train_rounds = [], [], [], [], [], [], [], []
    downloads = []
    for lines in runs:
        trained = [line["train"]["sites"] for line in lines if line.get("train") and "sites" in line["train"]]
        train_rounds.append(len(trained))
        last = trained[-1].values() if trained else [{}]  # `central` trains outside Flower
        purity.append({k: np.mean([m.get(k, np.nan) for m in last]) for k in ("cluster-f", "cluster-nmi")})
        passes.append({k: sum(m.get(k, np.nan) for sites in trained for m in sites.values())
                       for k in ("image-passes", "feature-passes")})
        evaluated = [line for line in lines if line.get("evaluate") and line["round"] > 0]
        finals.append(evaluated[-1]["evaluate"])
        last3.append(np.mean([line["evaluate"]["mean"]["mAP"] for line in evaluated[-3:]]))
        sizes = [line["train"]["bytes"]["received"] for line in lines if line.get("train")]
        up, down = exchanged_bytes(lines)
        uploads.append(up)
        downloads.append(down)
        last_uploads.append(sizes[-1])
        curves.append([(line["round"], np.mean([m["mAP"] for m in line["evaluate"]["sites"].values()]))
                       for line in lines if line.get("evaluate")])
    sites = sorted(finals[0]["sites"])
    keys = [k for k in ("rank1", "mAP", f"mAP@{LOWEST_SCALE}", "drift-gap") if all(k in f["sites"][s] for f in finals
                                                                              for s in sites)]
    per_site = {s: {k: float(np.mean([f["sites"][s][k] for f in finals])) for k in keys} for s in sites}
    gaps = [float(np.mean([f["sites"][s]["drift-gap"] for s in sites])) for f in finals] if "drift-gap" in keys else [np.nan]
    mean_maps = [f["mean"]["mAP"] for f in finals]
    first_trained = next((line["train"]["sites"] for line in runs[0] if line.get("train") and line["train"].get("sites")),
                         {})
    return {"method": method, "seeds": len(runs), "sites": per_site,
            "site_seeds": {s: [f["sites"][s]["mAP"] for f in finals] for s in sites},
            **held_out_summary(runs, TARGET_ADAPTED),  # the protocol of the tables before there were two
            SOURCE_ONLY: held_out_summary(runs, SOURCE_ONLY),
            "train_images": {s: float(first_trained.get(s, {}).get("num-examples", np.nan)) for s in sites},
            "mean": {k: float(np.mean([np.mean([f["sites"][s][k] for s in sites]) for f in finals])) for k in keys},
            "gap_spread": (float(min(gaps)), float(max(gaps))),
            "passes_per_round": float(np.mean([p["image-passes"] / n if n else np.nan
                                               for p, n in zip(passes, train_rounds)])),
            "mAP_spread": (float(min(mean_maps)), float(max(mean_maps))), "last3_mAP": float(np.mean(last3)),
            "upload_mb": float(np.mean(uploads)) / 1e6, "last_upload_mb": float(np.mean(last_uploads)) / 1e6,
            "download_mb": float(np.mean(downloads)) / 1e6,
            "curve": [(r, float(np.mean([c[i][1] for c in curves]))) for i, (r, _) in enumerate(curves[0])],
            "curve_band": [(r, float(min(c[i][1] for c in curves)), float(max(c[i][1] for c in curves)))
                           for i, (r, _) in enumerate(curves[0])],
            "purity": {k: float(np.mean([p[k] for p in purity])) for k in purity[0]},
            "passes": {k: float(np.mean([p[k] for p in passes])) for k in passes[0]}}


def held_out_summary(runs: list[list[dict]], protocol: str) -> dict:
    """The held-out sites' Rank-1 / mAP under ``protocol`` after each run's last evaluation, averaged over
    the runs, the model ranked there, and each run's mean mAP over them."""
    unseen = [unseen_results(next((line.get("unseen") for line in reversed(lines)
                                   if line.get("evaluate") and line.get("unseen")), None), protocol) for lines in runs]
    held_out = sorted(unseen[0]["sites"])
    return {"unseen": {s: {k: float(np.mean([u["sites"][s][k] for u in unseen])) for k in ("rank1", "mAP")}
                       for s in held_out},
            "unseen_models": {s: [u["sites"][s].get("model", "global") for u in unseen] for s in held_out},
            "unseen_mean_seeds": [float(np.mean([u["sites"][s]["mAP"] for s in held_out])) for u in unseen]
            if held_out else []}


def table(results: list[dict], caption: str) -> str:
    sites = sorted(results[0]["sites"])
    header = ["method", *(f"{s} R1 / mAP" for s in sites), "mean R1", "mean mAP (min-max over seeds)",
              "mean mAP, last 3 evals", "up / down MB per round (x FedPav)"]
    rows = []
    for r in results:
        low, high = r["mAP_spread"]
        upload = bytes_cell(r, results)
        rows.append([r["method"], *(f"{100 * r['sites'][s]['rank1']:.1f} / {100 * r['sites'][s]['mAP']:.1f}"
                                    for s in sites),
                     f"{100 * r['mean']['rank1']:.1f}", f"{100 * r['mean']['mAP']:.1f} ({100 * low:.1f}-{100 * high:.1f})",
                     f"{100 * r['last3_mAP']:.1f}", upload])
    return markdown_table(caption, header, rows)


def unsupervised_table(results: list[dict], caption: str) -> str:
    """mAP / Rank-1 per site and mean, cluster purity, and computation, one row per method."""
    sites = sorted(results[0]["sites"])
    header = ["method", *(f"{s} mAP / R1" for s in sites), "mean mAP (min-max over seeds)", "mean R1",
              "cluster pairwise F / NMI", "training image passes", "clustering feature passes"]

    def count(value: float) -> str:
        return "-" if np.isnan(value) else f"{value / 1000:.1f} k"

    rows = []
    for r in results:
        low, high = r["mAP_spread"]
        f, nmi = r["purity"]["cluster-f"], r["purity"]["cluster-nmi"]
        rows.append([r["method"], *(f"{100 * r['sites'][s]['mAP']:.1f} / {100 * r['sites'][s]['rank1']:.1f}"
                                    for s in sites),
                     f"{100 * r['mean']['mAP']:.1f} ({100 * low:.1f}-{100 * high:.1f})", f"{100 * r['mean']['rank1']:.1f}",
                     "- (labels)" if np.isnan(f) else f"{f:.2f} / {nmi:.2f}", count(r["passes"]["image-passes"]),
                     count(r["passes"]["feature-passes"])])
    return markdown_table(caption, header, rows)


def cross_site(args: argparse.Namespace, method: str, seed: int, low_scale: float | None = float(LOWEST_SCALE)) -> str:
    """A table: each site's own model (``local``: site_models.pt of the run) tested on every site
    (held-out ones too), mAP (%), with native / ¼-resolution queries unless ``low_scale`` is None.
    BatchNorm statistics stay with the sites under bn_stats=local, so each model first recomputes
    them on the tested site's training images (labels unused)."""
    folder = sorted((args.runs / method / f"seed{seed}").iterdir())[-1]
    saved = torch.load(folder / "site_models.pt", weights_only=True)
    spec, device = ModelSpec(**saved["model"]), pick_device()
    sites = {p.name: load_reid_data(p) for p in sorted(args.sites_root.iterdir()) if p.is_dir()}
    rows = []
    for trained_on, state in sorted(saved["state_dicts"].items()):
        cells = []
        for data in sites.values():
            model = build_model(spec)
            model.load_state_dict(state, strict=False)  # no running statistics: they stay on the sites
            adapt_batchnorm(model, load_images([s.path for s in data.train], spec.height, spec.width), device)
            results = evaluate_at_scales(model, data, device, (low_scale,) if low_scale else ())
            cells.append(f"{100 * results[1.0].mAP:.1f}" + (f" / {100 * results[low_scale].mAP:.1f}" if low_scale else ""))
        rows.append([trained_on, *cells])
    best = [max(range(len(rows)), key=lambda i: float(rows[i][1 + c].split(" / ")[0])) for c in range(len(sites))]
    rows.append(["best single site", *(f"{rows[b][0]}" for b in best)])
    queries = "with native / ¼-resolution queries" if low_scale else "native queries"
    return markdown_table(f"`{method}` (seed {seed}): each site's model (rows) tested on every site (columns), mAP (%) "
                          f"{queries}; the last row names the best model per column", ["trained on", *sites], rows)


def resdrift_table(results: list[dict], caption: str) -> str:
    """Per method: native and ¼-resolution mAP per site, the drift gap, and what training cost."""
    sites = sorted(results[0]["sites"])
    low = f"mAP@{LOWEST_SCALE}"
    header = ["method", *(f"{s} mAP native / ¼ / gap" for s in sites), "mean native mAP (min-max)", "mean ¼ mAP",
              "mean drift gap (min-max over seeds)", "training image passes / round"]
    rows = []
    for r in results:
        (low_map, high_map), (low_gap, high_gap) = r["mAP_spread"], r["gap_spread"]
        rows.append([r["method"], *(f"{100 * r['sites'][s]['mAP']:.1f} / {100 * r['sites'][s][low]:.1f} / "
                                    f"{100 * r['sites'][s]['drift-gap']:.1f}" for s in sites),
                     f"{100 * r['mean']['mAP']:.1f} ({100 * low_map:.1f}-{100 * high_map:.1f})",
                     f"{100 * r['mean'][low]:.1f}",
                     f"{100 * r['mean']['drift-gap']:.1f} ({100 * low_gap:.1f}-{100 * high_gap:.1f})",
                     f"{r['passes_per_round'] / 1000:.1f} k"])
    return markdown_table(caption, header, rows)


FAMILIES = {  # one panel each; a reference method may appear in several
    "FedReID options and baselines": ["fedpav", "fedpav_cdw", "fedpav_kd", "fedpav_cdw_kd", "fedpav_cluster", "local",
                                      "central"],
    "FedKLPR and its ablations": ["fedpav", "fedklpr", "fedklpr_fp16", "fedklpr_no_kll", "fedklpr_no_klaw",
                                  "fedklpr_no_praw", "fedklpr_no_pruning", "fedklpr_no_crr"],
    "FedUReID (no labels)": ["fedureid", "fedureid_no_personalization", "local_unsupervised", "fedpav"],
    "Resolution drift": ["fedpav", "fedpav_raf", "fedpav_multires_aug", "local"],
    "FedDG: cross-client styles": ["fedpav", "feddg", "feddg_no_share", "feddg_no_tone", "feddg_bn_mixed", "local"],
}
MARKERS = "os^vD<>pP*Xh"


def _style(method: str) -> dict:
    """The same colour and marker for a method in every panel and figure, distinct across methods."""
    index = METHODS.index(method) if method in METHODS else len(METHODS)
    hue = (2 * index) % 20 + (index // 10) % 2  # ten hues dark, then the same ten light: neighbours differ
    colour = plt.get_cmap("tab20")(hue) if index < 20 else plt.get_cmap("tab20b")((5 * (index - 20)) % 20)
    return {"color": colour, "marker": MARKERS[index % len(MARKERS)]}


def plot(results: list[dict], path: Path) -> None:
    """Mean mAP over rounds, one panel per family of methods, the seeds' min-max as a band."""
    by_method = {r["method"]: r for r in results}
    panels = [(title, [m for m in members if m in by_method]) for title, members in FAMILIES.items()]
    panels = [(title, members) for title, members in panels if members and not any(  # no panel inside another
        set(members) < set(others) for _, others in panels)]
    covered = {m for _, members in panels for m in members}
    if set(by_method) - covered:
        panels.append(("other", [m for m in by_method if m not in covered]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False, sharey=True)
    for axis, (title, members) in zip(axes[0], panels):
        for method in members:
            r, style = by_method[method], _style(method)
            rounds, means = zip(*[(x, 100 * y) for x, y in r["curve"]])
            axis.plot(rounds, means, label=f"{method} ({r['seeds']} seeds)", linewidth=1.6, markersize=5, **style)
            _, low, high = zip(*r["curve_band"])
            axis.fill_between(rounds, [100 * v for v in low], [100 * v for v in high], color=style["color"], alpha=0.15,
                              linewidth=0)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("mean mAP over sites (%); band: min-max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (fewer bytes, higher mAP), by bytes."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_bytes_against_map(results: list[dict], path: Path) -> None:
    """Mean MB per round, up plus down, against final mean mAP, one point per method with the seeds'
    min-max as error bars, and the Pareto front; ``central`` moves no bytes and is drawn as a line."""
    shown = [r for r in results if r["method"] != "central"]
    points = [(r["upload_mb"] + r["download_mb"], 100 * r["mean"]["mAP"]) for r in shown]
    fig, axis = plt.subplots(figsize=(8.5, 5.6))
    top = max(x for x, _ in points)
    bins = [round(x / (0.02 * top)) for x, _ in points]  # bytes within 2 % are the same bytes (metrics vary)
    same = {}  # methods that move the same bytes (every FedPav option) are spread sideways to stay legible
    for index, key in enumerate(bins):
        same.setdefault(key, []).append(index)
    offsets = {i: (k - (len(group) - 1) / 2) * 0.012 * top for group in same.values() for k, i in enumerate(group)}
    front = pareto_front([(key, y) for key, (_, y) in zip(bins, points)])
    drawn = [(points[i][0] + offsets[i], points[i][1]) for i in front]
    axis.step(*zip(*drawn), where="post", color="grey", linestyle="--", linewidth=1.2,
              label="Pareto front (fewer bytes, higher mAP): ringed", zorder=1)
    axis.scatter(*zip(*drawn), s=260, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
    for index, (r, (x, y)) in enumerate(zip(shown, points)):
        low, high = (100 * v for v in r["mAP_spread"])
        style = _style(r["method"])
        axis.errorbar(x + offsets[index], y, yerr=[[max(0.0, y - low)], [max(0.0, high - y)]], fmt=style["marker"], color=style["color"], markersize=8,
                      capsize=3, label=r["method"], zorder=2)
    for r in results:
        if r["method"] == "central":
            axis.axhline(100 * r["mean"]["mAP"], color=_style("central")["color"], linestyle=":",
                         label="central (pooled data, no bytes)")
    axis.set_xlabel("mean MB per round, up + down, all sites; equal bytes drawn side by side")
    axis.set_ylabel("final mean mAP over sites (%); bars: min-max over seeds")
    axis.set_xlim(0, 1.1 * top)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--unsupervised", action="store_true",
                        help="FedUReID's comparison (default methods: " + " ".join(UNSUPERVISED_METHODS) + ")")
    parser.add_argument("--federation", default="synthetic", choices=FEDERATIONS,
                        help="synthetic-resdrift: the resolution-drift benchmark (4 sites, profile resdrift); "
                             "synthetic-fedreid9: nine FedReID-shaped sites and two held-out ones")
    parser.add_argument("--sites", type=int, default=None, help="default: 3, or 4 for synthetic-resdrift")
    parser.add_argument("--sites-root", type=Path, default=None, help="default: data/<federation>")
    parser.add_argument("--public-root", type=Path, default=REPO / "data" / "synthetic-public")
    parser.add_argument("--profile", default=None, help="default: demo, or resdrift for synthetic-resdrift")
    parser.add_argument("--overrides", default="")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; results are averaged")
    parser.add_argument("--cached-only", action="store_true",
                        help="report only the (method, seed) runs saved already; each row says how many seeds it has")
    parser.add_argument("--tag", default="", help="keep and show results as METHOD+TAG: a variant run with "
                        "--overrides, e.g. --tag bn_average --overrides algorithm.bn_stats=average")
    parser.add_argument("--rerun", action="store_true", help="ignore results saved by earlier runs of this bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--leave-one-out", nargs="+", default=None, metavar="SITE",
                        help="synthetic-fedreid9: the FedDG-ReID protocol over these sites (each held out once while "
                             "the others train), e.g. market msmt17 cuhk01 cuhk03; default methods fedpav feddg")
    args = parser.parse_args()
    if args.federation == "synthetic-fedreid9":
        fedreid9_main(args)
        return
    drift = args.federation == "synthetic-resdrift"
    args.methods = args.methods or (RESDRIFT_METHODS if drift else UNSUPERVISED_METHODS if args.unsupervised else
                                    [m for m in METHODS if m not in [*UNSUPERVISED_METHODS[:3], *RESDRIFT_METHODS[1:3]]])
    args.sites = args.sites or federation_size(args.federation) or 3
    args.profile = args.profile or simulate.FEDERATION_PROFILES[args.federation]
    args.sites_root = (args.sites_root or REPO / "data" / args.federation).resolve()
    args.public_root = args.public_root.resolve()
    args.runs = args.out / "runs" / args.federation if args.federation != "synthetic" else args.out / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    simulate.ensure_synthetic_sites(args.sites_root, args.sites, 0, args.federation)
    simulate.ensure_public_set(args.public_root, 0)
    results = _runs_of(args.methods, args)
    cfg = compose_config({"profile": args.profile, "overrides": args.overrides})
    caption = (f"Synthetic sites (data seed 0), profile `{args.profile}`: {cfg.model.backbone} at "
               f"{cfg.model.height}x{cfg.model.width}, {cfg.federation.rounds} rounds x {cfg.train.local_epochs} "
               f"local epoch(s), training seeds {args.seeds}; Rank-1 / mAP (%) after the last round, "
               f"averaged over seeds.")
    name = "compare_resdrift" if drift else "compare_unsupervised" if args.unsupervised else "compare_algorithms"
    if args.unsupervised:
        caption = caption.replace(f"x {cfg.train.local_epochs} local epoch(s)", "(unsupervised epochs: see the presets)")
    if drift:
        caption = caption.replace("Synthetic sites", "synthetic-resdrift sites").replace(
            "Rank-1 / mAP (%)", "mAP (%) with native and ¼-resolution queries")
    text = (resdrift_table if drift else unsupervised_table if args.unsupervised else table)(results, caption)
    if drift and "local" in args.methods:
        text += "\n" + cross_site(args, "local", args.seeds[0])
    (args.out / f"{name}.md").write_text(text)
    plot(results, args.out / f"{name}.png")
    written = [args.out / f"{name}.md", args.out / f"{name}.png"]
    if name == "compare_algorithms":
        plot_bytes_against_map(results, args.out / "bytes_vs_map.png")
        written.append(args.out / "bytes_vs_map.png")
    print("\n" + text)
    print("written: " + ", ".join(str(p) for p in written))


FEDREID9_METHODS = ["fedpav", "local", "feddg", "feddg_no_share", "feddg_no_tone", "feddg_bn_mixed", "fedpav_cdw",
                    "fedpav_kd", "fedpav_cluster", "fedklpr", "fedklpr_no_pruning", "fedpav_compressed",
                    "fedklpr_compressed"]
LOSO_METHODS = ["fedpav", "feddg"]


def _runs_of(methods: list[str], args: argparse.Namespace) -> list[dict]:
    """Each method's summary over the seeds, running (or reusing) every (method, seed)."""
    results = []
    for method in methods:
        runs = []
        for seed in args.seeds:
            if args.cached_only and not (args.runs / labelled(method, args) / f"seed{seed}.jsonl").exists():
                print(f"== {method} seed {seed}: not run yet, left out (--cached-only)", flush=True)
                continue
            start = time.perf_counter()
            runs.append(cached_run(method, seed, args))
            print(f"== {method} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        results.append(summarise(labelled(method, args), runs))
    return results


def fedreid9_main(args: argparse.Namespace) -> None:
    """synthetic-fedreid9: the nine-site comparison with its two held-out sites, or with
    ``--leave-one-out`` the FedDG-ReID protocol over a group of its sites."""
    args.sites = args.sites or federation_size(args.federation)
    args.profile = args.profile or simulate.FEDERATION_PROFILES[args.federation]
    args.sites_root = (args.sites_root or REPO / "data" / args.federation).resolve()
    args.public_root = args.public_root.resolve()
    root = args.out / "runs" / args.federation
    args.out.mkdir(parents=True, exist_ok=True)
    simulate.ensure_synthetic_sites(args.sites_root, federation_size(args.federation), 0, args.federation)
    simulate.ensure_public_set(args.public_root, 0)
    cfg = compose_config({"profile": args.profile, "overrides": args.overrides})
    setting = (f"{cfg.model.backbone} at {cfg.model.height}x{cfg.model.width}, {cfg.federation.rounds} rounds x "
               f"{cfg.train.local_epochs} local epoch(s), training seeds {args.seeds}")
    if args.leave_one_out:
        args.group = list(args.leave_one_out)
        methods = args.methods or LOSO_METHODS
        by_method: dict[str, list[dict]] = {labelled(m, args): [] for m in methods}
        for site in args.group:
            args.held_out_site, args.runs = site, root / f"loso-{site}"
            for summary in _runs_of(methods, args):
                by_method[summary["method"]].append(summary)
        text = f"synthetic-fedreid9 (data seed 0), {setting}.\n\n" + fedreid9_tables.leave_one_out_table(
            by_method, args.group)
        written = [args.out / f"compare_fedreid9_loso{'+' + args.tag if args.tag else ''}.md"]
        written[0].write_text(text)
    else:
        args.runs = root
        results = _runs_of(args.methods or FEDREID9_METHODS, args)
        caption = (f"synthetic-fedreid9 (data seed 0), profile `{args.profile}`: {setting}; mAP (%) after the last "
                   "round, averaged over seeds; columns: training sites largest first (training images), then the "
                   "held-out sites.")
        text = fedreid9_tables.main_table(results, caption)
        methods = [r["method"] for r in results]
        gains = "local" in methods and any(m in methods for m in fedreid9_tables.GAIN_METHODS)
        if gains:
            text += "\n" + fedreid9_tables.gain_table(results)
            fedreid9_tables.plot_gains(results, args.out / "fedreid9_gains.png")
        text += "\n" + fedreid9_tables.held_out_table(results)
        if gains:  # about 100 evaluations: kept beside the runs once computed
            cached = args.runs / "local" / f"cross_site_seed{args.seeds[0]}.md"
            if not cached.exists() or args.rerun:
                cached.write_text(cross_site(args, "local", args.seeds[0], low_scale=None))
            text += "\n" + cached.read_text()
        suffix = f"+{args.tag}" if args.tag else ""  # a variant's tables go beside the main ones
        written = [args.out / f"compare_fedreid9{suffix}.md", args.out / f"compare_fedreid9{suffix}.png",
                   args.out / f"bytes_vs_map_fedreid9{suffix}.png"] + ([args.out / "fedreid9_gains.png"] if gains
                                                                       else [])
        written[0].write_text(text)
        plot(results, written[1])
        plot_bytes_against_map(results, written[2])
    print("\n" + text)
    print("written: " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
