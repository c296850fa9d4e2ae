"""Using a trained model: the model file, ReIDModel's preprocess/embed/rank, fedreid-eval, fedreid-search's
page and fedreid-export's ONNX and TorchScript graphs, on real files of a tiny synthetic site.

The models here are freshly initialised (what they rank does not matter, only that every tool ranks
as the evaluation does); the trained ones of a real run are tested in tests/test_python_api.py."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

import fedreid
from reid.apps import evaluate as eval_app
from reid.apps import export as export_app
from reid.apps import search as search_app
from reid.data.batch_augment import normalise
from reid.data.dataset import load_reid_data
from reid.data.tensor_cache import load_images
from reid.evaluate import evaluate_model
from reid.export import export_model
from reid.features import extract_features
from reid.models import ModelSpec, build_model, split_state
from reid.saved_model import BATCHNORM_MISSING, ModelFileError, ModelInfo, save_model

SPEC = ModelSpec(backbone="resnet10", height=64, width=32)
NAME = re.compile(r"^(-?\d+)_c(\d+)")


def _saved(path: Path, spec: ModelSpec = SPEC, seed: int = 0, local_bn: bool = False) -> Path:
    torch.manual_seed(seed)
    net = build_model(spec, num_classes=5)
    state = net.state_dict()
    if local_bn:  # the global model of a bn_stats=local run: SHARED arrays only
        state = split_state(state, "local")[0]
    info = ModelInfo(spec=spec, algorithm="fedpav", round=3, mAP=0.5, site="" if local_bn else "tiny",
                     bn_stats="local", batchnorm=BATCHNORM_MISSING if local_bn else "own", eval_batch_size=16)
    return save_model(path, state, info)


def test_a_model_file_loads_with_weights_only_and_rebuilds_the_same_network(tmp_path: Path) -> None:
    path = _saved(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)  # tensors and plain values only
    assert payload["format"] == "fedreid-model" and payload["model"]["backbone"] == "resnet10"
    assert not any(k.startswith("classifier.") for k in payload["state_dict"])  # identities stay on the site
    model = fedreid.load_model(path, device="cpu")
    torch.manual_seed(0)
    original = build_model(SPEC, num_classes=5).state_dict()
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert (model.info.site, model.info.round, model.info.mAP, model.batch_size) == ("tiny", 3, 0.5, 16)
    assert not model.needs_batchnorm


def test_bad_model_files_are_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        fedreid.load_model(tmp_path / "nowhere.pt")
    checkpoint = tmp_path / "global_model.pt"
    torch.save({"state_dict": {}, "round": 2}, checkpoint)
    with pytest.raises(ModelFileError, match="resume checkpoint; use model.pt"):
        fedreid.load_model(checkpoint)
    pickled = tmp_path / "code.pt"
    torch.save({"format": "fedreid-model", "hook": Path("/x")}, pickled)  # an object weights_only refuses
    with pytest.raises(ModelFileError, match="not a readable model file"):
        fedreid.load_model(pickled)
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(ModelFileError, match="not a readable model file"):
        fedreid.load_model(tmp_path / "junk.pt")


def test_preprocess_and_embed_are_exactly_the_evaluations_steps(tiny_site: Path, tmp_path: Path) -> None:
    model = fedreid.load_model(_saved(tmp_path / "m.pt"), device="cpu")
    paths = sorted((tiny_site / "query").iterdir())
    decoded = load_images(paths, SPEC.height, SPEC.width)
    batch = model.preprocess(tiny_site / "query")
    assert batch.dtype == torch.float32 and tuple(batch.shape) == (len(paths), 3, 64, 32)
    assert torch.equal(batch, normalise(decoded))
    pictures = [Image.open(p) for p in paths[:3]]
    assert torch.equal(model.preprocess(pictures), batch[:3])  # PIL images
    assert torch.equal(model.preprocess(decoded[:3]), batch[:3])  # a uint8 tensor at the model's size
    big = torch.nn.functional.interpolate(decoded[:2].float(), size=(128, 64)).to(torch.uint8)
    assert model.preprocess(big).shape == (2, 3, 64, 32)  # another size is resized
    expected = extract_features(model.net, decoded, torch.device("cpu"), batch_size=16)
    assert np.array_equal(model.embed(paths), expected)  # flip-sum and L2, as in evaluation
    assert np.allclose(model.embed(batch), expected, atol=1e-6)  # the preprocessed batch
    single = model.embed(paths, flip=False)
    assert np.allclose(np.linalg.norm(single, axis=1), 1.0, atol=1e-5) and not np.allclose(single, expected)
    with pytest.raises(TypeError, match="uint8"):
        model.embed(torch.zeros(1, 3, 64, 32, dtype=torch.int32))


def test_rank_lists_the_nearest_gallery_items_first(tiny_site: Path, tmp_path: Path) -> None:
    model = fedreid.load_model(_saved(tmp_path / "m.pt"), device="cpu")
    query, gallery = model.embed(tiny_site / "query"), model.embed(tiny_site / "gallery")
    ranking = model.rank(query, gallery, top_k=10)
    distances = 1.0 - query @ gallery.T
    assert ranking.indices.shape == (len(query), 10)
    assert np.array_equal(ranking.indices, np.argsort(distances, axis=1, kind="stable")[:, :10])
    assert np.all(np.diff(ranking.distances, axis=1) >= 0)
    assert model.rank(query, gallery, top_k=10_000).indices.shape == (len(query), len(gallery))
    from_files = model.rank(tiny_site / "query", tiny_site / "gallery", top_k=5)
    assert np.array_equal(from_files.indices, ranking.indices[:, :5])


def test_fedreid_eval_reports_the_evaluators_numbers_as_json(tiny_site: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = _saved(tmp_path / "m.pt")
    eval_app.main(["--model", str(path), "--data", str(tiny_site), "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    model = fedreid.load_model(path, device="cpu")
    result = evaluate_model(model.net, load_reid_data(tiny_site), torch.device("cpu"), batch_size=16)
    assert report["mAP"] == pytest.approx(result.mAP, abs=1e-9) and report["rank1"] == result.rank(1)
    assert report["mINP"] == pytest.approx(result.mINP) and report["mAP-market"] == pytest.approx(result.mAP_market)
    assert report["batchnorm"] == "the model's own"
    eval_app.main(["--model", str(path), "--data", str(tiny_site), "--device", "cpu"])
    text = capsys.readouterr().out
    assert "Rank-1" in text and f"{100 * result.mAP:6.2f}%" in text
    with pytest.raises(SystemExit, match="missing query folder"):
        eval_app.main(["--model", str(path), "--data", str(tmp_path), "--device", "cpu"])


def test_a_model_without_batchnorm_statistics_is_adapted_first_and_says_so(tiny_site: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = _saved(tmp_path / "global.pt", local_bn=True)
    model = fedreid.load_model(path, device="cpu")
    assert model.needs_batchnorm
    eval_app.main(["--model", str(path), "--data", str(tiny_site), "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    count = len(load_reid_data(tiny_site).train)
    assert f"recomputed on the {count} training images" in report["batchnorm"]
    assert "BatchNorm statistics recomputed" in captured.err
    with pytest.raises(SystemExit, match="no BatchNorm statistics"):
        export_app.main(["--model", str(path), "--format", "torchscript", "--out", str(tmp_path / "m.ts")])
    export_app.main(["--model", str(path), "--format", "torchscript", "--out", str(tmp_path / "m.ts"),
                     "--adapt-on", str(tiny_site / "train"), "--device", "cpu"])
    assert (tmp_path / "m.ts").is_file()


class _Page(HTMLParser):
    """The search page's queries and, for each, its ranked figures: (class, rank, file, distance)."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: dict[str, list[tuple[str, int, str, float]]] = {}
        self.current = ""
        self.scripts = 0
        self.image_sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.image_sources.append(a["src"] or "")
        if tag == "section" and a.get("class") == "query":
            self.current = a["data-query"] or ""
            self.queries[self.current] = []
        if tag == "figure" and "data-rank" in a:
            self.queries[self.current].append((a["class"] or "", int(a["data-rank"] or 0), a["data-file"] or "",
                                               float(a["data-distance"] or 0)))


def _expected_colour(query: str, hit: str) -> str:
    (qpid, qcam), (gpid, gcam) = (NAME.match(query).groups(), NAME.match(hit).groups())  # type: ignore[union-attr]
    if qpid != gpid:
        return "wrong"
    return "same-camera" if qcam == gcam else "match"


def test_the_search_page_shows_every_query_with_its_ranked_list_and_the_right_colours(
        tiny_site: Path, tmp_path: Path) -> None:
    path = _saved(tmp_path / "m.pt")
    out = tmp_path / "page" / "search.html"
    search_app.main(["--model", str(path), "--query", str(tiny_site / "query"), "--gallery", str(tiny_site / "gallery"),
                     "--top-k", "5", "--out", str(out), "--device", "cpu"])
    page = _Page()
    page.feed(out.read_text())
    queries = sorted(p.name for p in (tiny_site / "query").iterdir())
    assert sorted(page.queries) == queries
    model = fedreid.load_model(path, device="cpu")
    gallery = sorted(p.name for p in (tiny_site / "gallery").iterdir())
    ranking = model.rank(tiny_site / "query", tiny_site / "gallery", top_k=5)
    kinds = set()
    for row, query in enumerate(queries):
        figures = page.queries[query]
        assert [rank for _, rank, _, _ in figures] == [1, 2, 3, 4, 5]
        assert [name for _, _, name, _ in figures] == [gallery[j] for j in ranking.indices[row]]
        assert [d for _, _, _, d in figures] == pytest.approx(list(ranking.distances[row]), abs=1e-4)
        for colour, _, name, _ in figures:
            assert colour == _expected_colour(query, name), (query, name)
            kinds.add(colour)
    assert {"wrong", "match"} <= kinds
    assert page.scripts == 0 and all(src.startswith("data:image/jpeg;base64,") for src in page.image_sources)
    assert len(page.image_sources) == len(queries) * 6  # each query and its five
    grid = Image.open(out.with_suffix(".png"))
    assert grid.height > len(queries) * 96 and grid.width > 6 * 48
    with pytest.raises(SystemExit, match="neither an image file nor a folder"):
        search_app.main(["--model", str(path), "--query", str(tmp_path / "none"), "--gallery", str(tiny_site)])


@pytest.mark.parametrize("backbone", ["resnet10", "resnet50"])
def test_onnx_embeddings_and_rankings_match_pytorchs(backbone: str, tiny_site: Path, tmp_path: Path) -> None:
    spec = ModelSpec(backbone=backbone, height=64, width=32)
    model = fedreid.load_model(_saved(tmp_path / "m.pt", spec), device="cpu")
    model.adapt_batchnorm(tiny_site / "train")  # realistic statistics: a random net's are near zero
    onnx_file = export_model(model.net, "onnx", tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]

    def run(folder: Path) -> np.ndarray:  # two batch sizes, neither the one exported with
        batch = model.preprocess(folder).numpy()
        return np.concatenate([session.run(None, {name: batch[:7]})[0], session.run(None, {name: batch[7:]})[0]])

    query, gallery = run(tiny_site / "query"), run(tiny_site / "gallery")
    torch_query = model.embed(tiny_site / "query", flip=False)
    torch_gallery = model.embed(tiny_site / "gallery", flip=False)
    assert np.abs(query - torch_query).max() <= 1e-4 and np.abs(gallery - torch_gallery).max() <= 1e-4
    assert np.array_equal(model.rank(query, gallery, 10).indices, model.rank(torch_query, torch_gallery, 10).indices)
    if backbone == "resnet10":  # TorchScript: the same graph
        traced = torch.jit.load(str(export_model(model.net, "torchscript", tmp_path / "m.ts")))
        with torch.no_grad():
            assert np.abs(traced(model.preprocess(tiny_site / "query")).numpy() - torch_query).max() <= 1e-5
