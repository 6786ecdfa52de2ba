"""The int8 ONNX models the services run: shipped intact, close to the fp32 originals, and free of torch."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from frugalstream.llm.onnx_models import MODELS_DIR, length_batches, manifest

SENTENCES = [
    "What are your business hours?",
    "When are you open on weekends?",
    "My card still hasn't arrived after two weeks, what should I do?",
    "Write a Python function that reverses a linked list.",
    "Summarize the following report in three bullet points: " + "revenue grew in every region " * 40,
]


@given(st.lists(st.integers(min_value=1, max_value=300), max_size=80), st.integers(min_value=1, max_value=32))
def test_length_batches_cover_every_text_once_within_the_padding_budget(lengths: list[int], size: int) -> None:
    batches = length_batches(lengths, size, max_batch_tokens=1024)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= size
        # a batch over the budget is only ever a single long text
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 1024


def test_shipped_model_files_match_the_manifest() -> None:
    data = manifest()
    for entry in data["models"].values():
        assert hashlib.sha256((MODELS_DIR / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert hashlib.sha256((MODELS_DIR / "tokenizer.json").read_bytes()).hexdigest() == data["tokenizer_sha256"]


def test_int8_embeddings_stay_close_to_the_fp32_model() -> None:
    pytest.importorskip("torch", reason="the fp32 reference needs the train extra")
    from frugalstream.llm.embedder import MiniLMEmbedder

    int8 = MiniLMEmbedder(precision="int8").embed(SENTENCES)
    fp32 = MiniLMEmbedder(precision="fp32").embed(SENTENCES)
    cosine = np.sum(int8 * fp32, axis=1)
    assert cosine.min() >= 0.97
    assert np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-4)


def test_a_texts_vector_never_depends_on_the_texts_embedded_with_it() -> None:
    """A cache needs one vector per text: int8 activations are quantized per tensor, so texts run alone."""
    from frugalstream.llm.embedder import MiniLMEmbedder

    embedder = MiniLMEmbedder(cache_size=0)  # no text LRU: both calls run the model
    alone = embedder.embed(SENTENCES[:1])
    together = embedder.embed(SENTENCES)
    assert np.array_equal(alone[0], together[0])


def test_int8_cross_encoder_agrees_with_the_fp32_one() -> None:
    pytest.importorskip("torch", reason="the fp32 reference needs the train extra")
    from frugalstream.llm.onnx_models import OnnxPairScorer
    from frugalstream.llm.pair_encoder import PairEncoder

    a = ["How do I learn Python?", "What are your business hours?", "How do I reset my password?"]
    b = ["How do I learn Java?", "When are you open?", "How can I reset my password?"]
    int8 = OnnxPairScorer().probabilities(a, b)
    fp32 = PairEncoder.load().probabilities(a, b)
    assert np.max(np.abs(int8 - fp32)) <= 0.1


def test_services_build_and_run_their_models_without_torch() -> None:
    """The default install has no torch: block it, then build every service and run both models."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {"torch", "transformers", "sentence_transformers", "safetensors"}:
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        from frugalstream.bootstrap import SERVICE_NAMES, Resources, build_services
        from frugalstream.runtime.settings import Settings
        res = Resources(Settings())
        build_services(SERVICE_NAMES, res)
        vec = res.embedder.inner.embed(["What are your business hours?"])
        decision = res.verifier.verify("what are your business hours", "when are you open", 0.85)
        print(vec.shape, decision.reason)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 384) model" in out.stdout
