"""Export a model for serving: ONNX (with the ``[export]`` extra) or TorchScript.

The exported graph takes what ``ReIDModel.preprocess`` returns (float32 [B, 3, H, W], ImageNet-
normalised, any batch size) and returns the L2-normalised embedding of one pass [B, 512]: what
``ReIDModel.embed(x, flip=False)`` computes. A serving stack that wants the evaluation's flip-sum
adds the embeddings of the image and its mirror and normalises again.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from reid.models import ReIDNet

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


class EmbeddingGraph(nn.Module):
    """The network from a normalised batch to L2-normalised bottleneck features (eval mode)."""

    def __init__(self, net: ReIDNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.features(images), dim=1)


def export_model(net: ReIDNet, fmt: str, out: Path, opset: int = 18) -> Path:
    """Write ``net`` as ``fmt`` to ``out``, with a dynamic batch dimension."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    graph = EmbeddingGraph(net.cpu().float()).eval()
    example = torch.zeros(2, 3, net.spec.height, net.spec.width)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch.jit is deprecated upstream but still the format TorchServe loads
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(graph, example)
        traced.save(str(out))
        return out
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401 - torch's ONNX exporter needs it
    except ImportError as error:
        raise RuntimeError(f"ONNX export needs the export extra: pip install 'fedreid[export]' ({error})") from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes={"images": {0: batch}},
                                    opset_version=opset, verbose=False, external_data=False)
    program.save(str(out), external_data=False)
    return out
