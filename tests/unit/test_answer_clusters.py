"""Answer clusters, the second semantic path: the experiment's math, served only from a confident cluster of two
or more same-answer entries, under the verifier path's servability rules, audited and calibrated on its own
threshold (`answer_cluster`), never the verifier's."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from frugalstream.audit.logic import Auditor, knob_of
from frugalstream.dedupe.answer_clusters import MODEL_FILE, ClusterModel, features, shipped_model
from frugalstream.dedupe.audit_sampling import AuditSampler
from frugalstream.dedupe.logic import Deduper
from frugalstream.dedupe.lookup import SemanticHit
from frugalstream.dedupe.results import Answer, Audit, Dispatch
from frugalstream.dedupe.semantic import SemanticIndex
from frugalstream.dedupe.wiring import build_deduper, semantic_policy
from frugalstream.llm.cache_keys import cache_keys
from frugalstream.llm.embedder import DIM, AsyncEmbedder, HashingEmbedder, encode_vector
from frugalstream.llm.judges import MatchJudge
from frugalstream.llm.thresholds import ThresholdBook
from frugalstream.llm.verifier import VerifierDecision
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import CacheEntry, ChatMessage, LLMRequest, LLMResponse, Route, RoutedRequest, TokenUsage
from frugalstream.schemas.audits import AuditAnswer, ThresholdChange

SETTINGS = Settings(semantic_verifier="features", semantic_recall_cosine={"faq": 0.5}, audit_rate=1.0,
                    audit_judges={"default": "match"})
Vec = np.ndarray


class RejectAll:
    """A verifier that turns every candidate down (score 0.1), counting the pairs it is asked."""

    def __init__(self) -> None:
        self.asked = 0

    def verify(self, query: str, candidate: str, cosine: float, threshold: float) -> VerifierDecision:
        return self.verify_batch([(query, candidate, cosine, threshold)])[0]

    def verify_batch(self, pairs: Sequence[tuple[str, str, float, float]]) -> list[VerifierDecision]:
        self.asked += len(pairs)
        return [VerifierDecision(0.1, False, "model") for _ in pairs]


def unit(v: Vec) -> Vec:
    return (v / np.linalg.norm(v)).astype(np.float32)


class Space:
    """Hand-made 384-d unit vectors: random directions, and vectors at a chosen cosine to one."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)

    def direction(self) -> Vec:
        return unit(self.rng.standard_normal(DIM))

    def near(self, d: Vec, cos: float) -> Vec:
        r = self.rng.standard_normal(DIM)
        r = unit(r - (r @ d) * d)
        return unit(cos * d + np.sqrt(1 - cos * cos) * r)


def routed(rid: str, text: str, *, tenant: str = "acme", tier: str = "small", ttl_s: int | None = None,
           vector: Vec | None = None) -> RoutedRequest:
    request = LLMRequest(id=rid, tenant=tenant, messages=(ChatMessage(role="user", content=text),),
                         cache={"ttl_s": ttl_s})  # type: ignore[arg-type]
    route = Route(task_type="faq", tier=tier, model="gpt-4o-mini", provider="simulated", reason="test",  # type: ignore[arg-type]
                  input_tokens=10, full_input_tokens=10, baseline_model="gpt-4o")
    return RoutedRequest(request=request, route=route, keys=cache_keys(request, tier), routed_at=time.time(),  # type: ignore[arg-type]
                         embedding=None if vector is None else encode_vector(vector))


def entry(rid: str, content: str, *, tier: str = "small", tenant: str = "acme", stored_at: float = 1000.0,
          expires_at: float | None = None) -> CacheEntry:
    r = routed(rid, f"question {rid}", tenant=tenant, tier=tier)
    return CacheEntry(keys=r.keys, request_id=rid, tenant=tenant, content=content, model="gpt-4o-mini",
                      output_tokens=5, stored_at=stored_at, expires_at=expires_at)


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


@pytest.fixture
def index(clock: list[float]) -> Iterator[tuple[SemanticIndex, RejectAll]]:
    verifier = RejectAll()
    idx = SemanticIndex(AsyncEmbedder(HashingEmbedder()), verifier, semantic_policy(SETTINGS), clock=lambda: clock[0])
    yield idx, verifier
    idx.close()


def fill(idx: SemanticIndex, items: Sequence[tuple[CacheEntry, Vec]]) -> None:
    idx.add_vectors([e for e, _ in items], np.stack([v for _, v in items]))


def ask(idx: SemanticIndex, q: Vec, **kw: object) -> SemanticHit | None:
    return idx.match_vectors([routed("q", "a reworded question", **kw)], q[None])[0]  # type: ignore[arg-type]


# --- the math ------------------------------------------------------------------------------------------------------

def test_features_match_a_hand_checked_case() -> None:
    # cluster 0: two members at cosine 0.9 and 0.8 to the query, 0.7 to each other (|S|^2 = 2 + 2 * 0.7);
    # cluster 1: one member at cosine 0.3.
    sims = np.array([0.9, 0.8, 0.3], dtype=np.float32)
    win, best, f = features(sims, np.array([0, 0, 1]), np.array([3.4, 1.0]), np.array([2, 1]), 10, 0.1)
    w = np.exp([0.0, -1.0, -6.0])
    assert (win, best) == (0, 0)
    assert f == pytest.approx([0.9, 0.3, (w[0] + w[1]) / w.sum(), 2, 1.7 / np.sqrt(3.4), 0.3, np.log(3), 0.85, 0.7],
                              rel=1e-6)
    design = ClusterModel.design(f)
    assert design[8:] == pytest.approx([0.6, 1.7 / np.sqrt(3.4) - 0.3, 0.15], rel=1e-6)
    # eleven members of answer 0 at 0.95 .. 0.45, answer 1 beyond the 10 nearest: top_other is the 10th cosine
    sims = np.array([*np.linspace(0.95, 0.45, 11), 0.3], dtype=np.float32)
    _, best, f = features(sims, np.array([0] * 11 + [1]), np.array([40.0, 1.0]), np.array([11, 1]), 10, 0.1)
    assert best == 0 and f[1] == pytest.approx(sims[9]) and f[2] == pytest.approx(1.0) and f[3] == 10


def test_serving_math_reproduces_what_the_shipped_weights_were_fit_on() -> None:
    """The export stored cases as the experiment's `features` and `Logistic` computed them; serving must agree."""
    model, cases = shipped_model(), json.loads(MODEL_FILE.read_text())["reference"]
    assert len(cases) >= 2
    for case in cases:
        sims = np.array(case["sims"], dtype=np.float32)
        _, _, f = features(sims, np.array(case["answers"]), np.array(case["norm2"]), np.array(case["size"]),
                           model.k, model.temperature)
        assert f == pytest.approx(case["features"], rel=1e-9, abs=1e-12)
        assert model.prob(f) == pytest.approx(case["probability"], rel=1e-9)


def test_cluster_sums_are_kept_on_add_and_rebuilt_by_the_sweep(index: tuple[SemanticIndex, RejectAll],
                                                                clock: list[float]) -> None:
    idx, _ = index
    s = Space()
    a = s.direction()
    vecs = [s.near(a, 0.9) for _ in range(4)]
    fill(idx, [(entry("a1", "Five days."), vecs[0]), (entry("a2", "five   DAYS"), vecs[1]),
               (entry("a3", "Five days!", expires_at=1500.0), vecs[2]), (entry("e", " "), vecs[3])])
    clusters = next(iter(idx._shards.values())).clusters
    assert len(clusters) == 3 and clusters.size.tolist() == [3], "same normalized answer; no text, no cluster"
    queries = np.stack([s.near(a, 0.7), s.direction()])
    assert clusters.similarities(queries) == pytest.approx(queries @ np.stack(vecs[:3]).T, abs=1e-5)
    total = vecs[0] + vecs[1] + vecs[2]
    assert clusters.sums[0] == pytest.approx(total, abs=1e-6)
    assert clusters.norm2[0] == pytest.approx(float(total @ total), rel=1e-6)
    clock[0] = 2000.0
    assert idx.sweep_shards() == 1
    rebuilt = next(iter(idx._shards.values())).clusters
    assert rebuilt.size.tolist() == [2] and rebuilt.positions == [0, 1]
    assert rebuilt.norm2[0] == pytest.approx(float((vecs[0] + vecs[1]) @ (vecs[0] + vecs[1])), rel=1e-6)


# --- serving -------------------------------------------------------------------------------------------------------

def two_clusters(s: Space, q: Vec, n_a: int = 3) -> list[tuple[CacheEntry, Vec]]:
    """n_a entries answering "A" at cosines 0.9, 0.85, ... to the query; three answering "B" far from it."""
    b = s.direction()
    return [*[(entry(f"a{i}", "Answer A."), s.near(q, 0.9 - 0.05 * i)) for i in range(n_a)],
            *[(entry(f"b{i}", "Answer B."), s.near(b, 0.9)) for i in range(3)]]


def test_a_rewording_near_a_cluster_is_served_its_answer_when_the_verifier_rejects(
        index: tuple[SemanticIndex, RejectAll]) -> None:
    idx, verifier = index
    s = Space()
    q = s.direction()
    fill(idx, two_clusters(s, q))
    hit = ask(idx, q)
    assert verifier.asked > 0, "the verifier was asked first, and said no"
    assert hit is not None and hit.rule == "answer_cluster" and hit.entry.content == "Answer A."
    assert hit.entry.request_id == "a0" and hit.similarity == pytest.approx(0.9, abs=1e-4), "the nearest member"
    assert hit.threshold == shipped_model().threshold and hit.score is not None and hit.score >= hit.threshold
    assert idx.near_misses == [()], "a request the cluster path served is no near miss"


def test_a_query_between_two_close_clusters_is_not_served(index: tuple[SemanticIndex, RejectAll]) -> None:
    idx, _ = index
    s = Space()
    a = s.direction()
    b = s.near(a, 0.8)
    fill(idx, [*[(entry(f"a{i}", "Answer A."), s.near(a, 0.9)) for i in range(3)],
               *[(entry(f"b{i}", "Answer B."), s.near(b, 0.9)) for i in range(3)]])
    assert ask(idx, unit(a + b)) is None
    assert "verifier" in [n.rule for n in idx.near_misses[0]], "the verifier's rejected candidate stays a near miss"


def test_a_cluster_of_one_never_serves(index: tuple[SemanticIndex, RejectAll]) -> None:
    idx, _ = index
    s = Space()
    q = s.direction()
    items = two_clusters(s, q, n_a=1)
    fill(idx, items)
    assert ask(idx, q) is None, "a single entry with the answer is no evidence that questions share it"
    sims = next(iter(idx._shards.values())).clusters.similarities(q[None])[0]
    vote = next(iter(idx._shards.values())).clusters.vote(sims, shipped_model())
    assert vote is not None and vote.confidence == 0.0
    fill(idx, [(entry("a-second", "answer a"), s.near(q, 0.8))])
    hit = ask(idx, q)
    assert hit is not None and hit.rule == "answer_cluster" and hit.entry.request_id == "a0", "two members serve"


def test_cluster_hits_keep_the_tier_expiry_and_max_age_rules(index: tuple[SemanticIndex, RejectAll],
                                                              clock: list[float]) -> None:
    idx, _ = index
    s = Space()
    q = s.direction()
    fill(idx, [(entry("cheap", "Answer A.", tier="small"), s.near(q, 0.95)),
               (entry("stale", "Answer A.", tier="large", expires_at=900.0), s.near(q, 0.9)),
               (entry("old", "Answer A.", tier="large", stored_at=100.0), s.near(q, 0.88)),
               (entry("good", "Answer A.", tier="large", expires_at=1200.0), s.near(q, 0.85)),
               *[(entry(f"b{i}", "Answer B."), s.near(s.direction(), 0.9)) for i in range(2)]])
    small = ask(idx, q)
    assert small is not None and small.entry.request_id == "cheap"
    large = ask(idx, q, tier="large", ttl_s=600)
    assert large is not None and large.rule == "answer_cluster"
    assert large.entry.request_id == "good" and large.similarity == pytest.approx(0.85, abs=1e-4), \
        "not a cheaper tier's, nor an expired one, nor one older than the request's max age"
    clock[0] = 1300.0
    assert ask(idx, q, tier="large", ttl_s=600) is None, "nothing servable left in the cluster"


def test_a_cluster_never_serves_another_tenant(index: tuple[SemanticIndex, RejectAll]) -> None:
    idx, _ = index
    s = Space()
    q = s.direction()
    fill(idx, two_clusters(s, q))
    assert ask(idx, q, tenant="globex") is None
    assert ask(idx, q) is not None


def test_the_settings_turn_the_path_off_or_move_its_threshold() -> None:
    s = Space()
    q = s.direction()
    items = two_clusters(s, q)
    results = []
    for settings in (Settings(semantic_verifier="features", semantic_answer_clusters=False),
                     Settings(semantic_verifier="features", answer_cluster_threshold=0.5),
                     Settings(semantic_verifier="features", semantic_task_types=("classification",))):
        idx = SemanticIndex(AsyncEmbedder(HashingEmbedder()), RejectAll(), semantic_policy(settings),
                            clock=lambda: 1000.0)
        fill(idx, items)
        results.append(ask(idx, q))
        idx.close()
    off, moved, other_type = results
    assert off is None and other_type is None
    assert moved is not None and moved.threshold == 0.5


# --- audits and the production path ---------------------------------------------------------------------------------

def test_the_audit_of_a_cluster_hit_names_its_path_so_it_labels_only_the_cluster_threshold() -> None:
    sampler, r = AuditSampler(SETTINGS), routed("r1", "when does my card arrive")
    e = entry("a0", "Answer A.")
    cluster = sampler.on_hit(r, SemanticHit(e, 0.8, 0.99, 0.97, rule="answer_cluster"))
    verified = sampler.on_hit(r, SemanticHit(e, 0.93, 0.95, 0.89))
    assert cluster is not None and verified is not None
    assert cluster.request.kind == "cache_semantic" and cluster.request.job is not None
    assert (cluster.request.score, cluster.request.threshold, cluster.request.rule) == (0.99, 0.97, "answer_cluster")
    assert (verified.request.score, verified.request.threshold, verified.request.rule) == (0.95, 0.89, "verifier")
    assert (knob_of(cluster.request), knob_of(verified.request)) == ("answer_cluster", "semantic_verify")


def response(r: RoutedRequest, content: str) -> LLMResponse:
    return LLMResponse(request_id=r.request.id, tenant=r.request.tenant, source="llm", content=content,
                       model="gpt-4o-mini", tier="small", task_type="faq", finish_reason="stop",
                       usage=TokenUsage(input_tokens=10, output_tokens=5), keys=r.keys, cacheable=True,
                       responded_at=time.time())


async def answered_clusters(s: Space, q: Vec, settings: Settings = SETTINGS) -> Deduper:
    """A deduper whose verifier rejects every pair, its cache filled with `two_clusters(s, q)` the way traffic
    fills it: each question dispatched, then answered."""
    d = build_deduper(settings, AsyncEmbedder(HashingEmbedder()), RejectAll())
    cached = [(routed(f"c{i}", f"cached question {i}", vector=v), e.content)
              for i, (e, v) in enumerate(two_clusters(s, q))]
    assert all(isinstance(x, Dispatch) for x in await d.handle(requests=[(r, 0) for r, _ in cached]))
    await d.handle(answers=[(response(r, content), 0) for r, content in cached])
    return d


async def test_the_deduper_serves_a_cluster_hit_and_audits_it_on_the_cluster_path() -> None:
    s = Space()
    q = s.direction()
    d = await answered_clusters(s, q)
    decisions = await d.handle(requests=[(routed("new", "a reworded question", vector=q), 0)])
    answers = [x for x in decisions if isinstance(x, Answer)]
    audits = [x.request for x in decisions if isinstance(x, Audit)]
    assert [(a.response.source, a.response.content) for a in answers] == [("cache_semantic", "Answer A.")]
    assert [(a.kind, a.rule) for a in audits] == [("cache_semantic", "answer_cluster")]
    assert audits[0].score is not None and audits[0].threshold is not None and audits[0].score >= audits[0].threshold
    assert not d.audits._near, "served: not remembered as a near miss"


def test_the_shipped_model_loads_with_its_eleven_weights() -> None:
    model = ClusterModel.load()
    raw = json.loads(MODEL_FILE.read_text())
    assert len(model.weights) == len(model.mean) == len(model.std) == len(model.names) == 11
    assert (model.k, model.temperature, model.min_size) == (10, 0.1, 2) and 0.5 < model.threshold < 1
    assert set(raw["provenance"]["fit_on"]) == {"clinc_train", "banking77"}
    assert "export_answer_cluster_model.py" in raw["provenance"]["command"]


def test_the_tenants_live_cluster_threshold_decides_and_a_vote_short_of_it_is_a_near_miss(
        index: tuple[SemanticIndex, RejectAll]) -> None:
    book = ThresholdBook()
    idx = SemanticIndex(AsyncEmbedder(HashingEmbedder()), RejectAll(), semantic_policy(SETTINGS, book),
                        clock=lambda: 1000.0)
    s = Space()
    q = s.direction()
    fill(idx, two_clusters(s, q))
    served = ask(idx, q)
    assert served is not None and served.rule == "answer_cluster"
    book.update(ThresholdChange(tenant="acme", task_type="faq", knob="answer_cluster", value=1.0,
                                previous=shipped_model().threshold, reason="bound_broken", target=0.99, n=1,
                                estimate=0.0, low=0.0, high=0.8, changed_at=1.0))
    assert ask(idx, q) is None, "the tenant's threshold moved past every vote"
    [near] = [n for n in idx.near_misses[0] if n.rule == "answer_cluster"]
    assert near.entry.content == "Answer A." and near.threshold == 1.0 and near.score == pytest.approx(served.score)
    fill(idx, [(entry("g0", "Answer A.", tenant="globex"), s.near(q, 0.9)),
               (entry("g1", "Answer A.", tenant="globex"), s.near(q, 0.85))])
    other = ask(idx, q, tenant="globex")
    assert other is not None and other.threshold == shipped_model().threshold, "another tenant keeps its own"
    idx.close()


async def test_a_rejected_cluster_hit_tightens_the_cluster_threshold_only_and_dedupe_obeys_it() -> None:
    s = Space()
    q = s.direction()
    d = await answered_clusters(s, q)
    auditor = Auditor(SETTINGS, {"match": MatchJudge()}, book=d.thresholds)
    verify_before = auditor.current("acme", "faq", "semantic_verify")
    [audit] = [x.request for x in await d.handle(requests=[(routed("new", "reworded", vector=q), 0)])
               if isinstance(x, Audit)]
    assert audit.rule == "answer_cluster" and audit.score is not None
    wrong = audit.model_copy(update={"reference": AuditAnswer(content="Answer C."), "job": None})  # the baseline's
    records, changes = await auditor.judge([wrong])
    assert [r.verdict for r in records] == ["reject"]
    assert [(c.knob, c.reason) for c in changes] == [("answer_cluster", "bound_broken")]
    assert changes[0].value > audit.score, "tightened past the false hit at once"
    assert auditor.current("acme", "faq", "semantic_verify") == verify_before, "the verifier's threshold stays"
    again = await d.handle(requests=[(routed("again", "reworded again", vector=q), 0)])
    assert [type(x) for x in again] == [Dispatch], "the cluster no longer serves this confidence"
    labels = {a.request.rule: a.request for a in
              d.audits.on_answer(response(routed("again", "reworded again", vector=q), "Answer C."))}
    assert set(labels) == {"verifier", "answer_cluster"}, "a free label per path, under two audit ids"
    assert labels["verifier"].audit_id != labels["answer_cluster"].audit_id
    label = labels["answer_cluster"]
    assert (label.kind, label.candidate) == ("near_miss", AuditAnswer(content="Answer A.", model="gpt-4o-mini"))
    records, _ = await auditor.judge(list(labels.values()))
    assert {(r.verdict, knob_of(r)) for r in records} == {("reject", "answer_cluster"), ("reject", "semantic_verify")}
