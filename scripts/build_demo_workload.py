"""Build the sample workload that `frugalstream demo` replays.

    .venv/bin/python scripts/build_demo_workload.py [--data /work/shared/data] [--seed 20240611]

Writes `services/frugalstream/tools/data/demo_workload.jsonl.gz` (one `frugalstream.schemas.LLMRequest` per
line, every row validated) and `services/frugalstream/tools/data/DEMO_WORKLOAD.md` (the mix, how it is
shaped, and the attribution every source requires).
Same data + same seed = byte-identical output (gzip mtime is pinned to 0).

Only sources whose license allows redistribution are read: banking77 (CC BY 4.0), clinc150 (CC BY 3.0),
mt_bench questions and GPT-4 reference answers (FastChat, Apache-2.0), arena_hard (Apache-2.0), RouteLLM's
GSM8K / MMLU prompts (Apache-2.0; GSM8K and MMLU are MIT), the Azure LLM inference trace 2023 (CC BY 4.0:
arrival gaps) and the Mooncake traces (Apache-2.0: long-context input lengths). Templates, assistant replies
in the long histories and tool results are written here.

The mix is shaped like production traffic, not like a cache showcase: FAQ popularity is Zipf-like over
intents and, inside an intent, over wordings, so exact repeats, rewordings and first-time questions arise
from sampling rather than being planted; routine jobs are mostly unique; hard prompts are all unique.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import random
import re
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from demo_workload_batch import doc_section, shape  # noqa: E402  (the deferrable share, the long prefixes)

from frugalstream.llm.cache_keys import normalize_text  # noqa: E402
from frugalstream.llm.tokens import TokenCounter  # noqa: E402
from frugalstream.schemas import ChatMessage, LLMRequest, TaskType, ToolCall  # noqa: E402
from frugalstream.tools.demo_workload import ARRIVAL_TAG, MIX_RANGES, WORKLOAD_TAG, WORKLOADS  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data")
OUT_DIR = ROOT / "services" / "frugalstream" / "tools" / "data"
OUT_FILE = OUT_DIR / "demo_workload.jsonl.gz"
DOC_FILE = OUT_DIR / "DEMO_WORKLOAD.md"
DEFAULT_SEED = 20240611
MAX_GZ_BYTES = 400_000
MAX_MESSAGE_BYTES = 1_000_000
COUNT_MODEL = "gpt-4o"  # token statistics in the doc use o200k_base

# Requests per category; shares land in the middle of frugalstream.tools.demo_workload.MIX_RANGES.
COUNTS: dict[str, int] = {"faq": 324, "routine": 180, "hard": 108, "long_history": 72, "pinned": 36}

# ----------------------------------------------------------------------------------------------------------
# Tenants of the FAQ traffic
# ----------------------------------------------------------------------------------------------------------

ACME_SYSTEM = (
    "You are the virtual assistant of Acme Bank, a mobile-first bank. Answer customer questions about cards, "
    "payments, transfers, top-ups, exchange rates, fees and account security in a friendly, concise way "
    "(at most four sentences). Never ask for a full card number, PIN or password. If the question needs "
    "access to the customer's account, tell them to open the in-app chat with a support agent."
)
GLOBEX_SYSTEM = (
    "You are Globex Assistant, a personal assistant for travel, dining, car care, home, work and everyday "
    "questions. Give short, practical answers. If a request is outside what you can help with, say so "
    "briefly and suggest where the user could look instead."
)
INITECH_SYSTEM = (
    "You are the help bot of Initech Card Services. Answer questions about credit cards, bank accounts, "
    "bills, rewards and credit scores. Keep answers under 80 words and never give personalised financial "
    "advice."
)
HOOLI_SYSTEM = (
    "You are Hooli Copilot, the internal assistant of Hooli employees. Be accurate and show your reasoning "
    "when a question needs it. Use Markdown for code and lists."
)
AGENT_ASSIST_SYSTEM = (
    "You help customer support agents. Write in plain, warm English, no marketing language, and never "
    "promise refunds or timelines that policy does not guarantee."
)

GLOBEX_DOMAINS = ("travel", "kitchen_and_dining", "auto_and_commute", "utility", "home", "work", "small_talk")
INITECH_DOMAINS = ("banking", "credit_cards")


@dataclass(frozen=True)
class FaqTenant:
    name: str
    system: str
    max_tokens: int | None
    share: float  # of the FAQ category
    tags: dict[str, str]
    intent_zipf: float  # popularity exponent over intents
    wording_zipf: float  # popularity exponent over the wordings of one intent
    oos_rate: float = 0.0  # out-of-scope questions (clinc150 oos): should never hit


FAQ_TENANTS: tuple[FaqTenant, ...] = (
    FaqTenant("acme-bank", ACME_SYSTEM, 300, 0.50, {"team": "support", "feature": "help-chat"}, 1.1, 1.3),
    FaqTenant("globex-assistant", GLOBEX_SYSTEM, 256, 0.35, {"team": "assistant", "feature": "concierge"},
              1.0, 1.25, oos_rate=0.06),
    FaqTenant("initech-cards", INITECH_SYSTEM, None, 0.15, {"team": "support", "feature": "card-faq"}, 1.1, 1.3),
)

# ----------------------------------------------------------------------------------------------------------
# Source loading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Sources:
    banking: dict[str, list[str]]
    clinc: dict[str, list[str]]
    clinc_domains: dict[str, list[str]]
    clinc_oos: list[str]
    mt_bench: list[dict[str, Any]]
    mt_refs: dict[int, list[str]]
    arena: list[dict[str, Any]]
    gsm8k: list[str]
    mmlu: list[tuple[str, str]]
    azure_ms: list[int]
    mooncake_inputs: list[int]


def _dedup(texts: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for t in texts:
        t = t.strip()
        key = normalize_text(t)
        if t and key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_sources(data: Path) -> Sources:
    banking: dict[str, list[str]] = defaultdict(list)
    with (data / "banking77" / "train.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            banking[row["category"]].append(row["text"])
    clinc_raw = json.loads((data / "clinc150" / "data_full.json").read_text(encoding="utf-8"))
    clinc: dict[str, list[str]] = defaultdict(list)
    for text, intent in clinc_raw["train"]:
        clinc[intent].append(text)
    domains: dict[str, list[str]] = json.loads((data / "clinc150" / "domains.json").read_text(encoding="utf-8"))

    mt_refs = {int(r["question_id"]): list(r["choices"][0]["turns"])
               for r in _jsonl(data / "mt_bench" / "reference_answer_gpt-4.jsonl")}

    gsm8k: list[str] = []
    with (data / "routellm_eval" / "gsm8k_responses.csv").open(encoding="utf-8", newline="") as f:
        gsm8k = [row["prompt"] for row in csv.DictReader(f)]
    mmlu: list[tuple[str, str]] = []
    with (data / "routellm_eval" / "mmlu_responses.csv").open(encoding="utf-8", newline="") as f:
        mmlu = [(row["subject"], row["prompt"]) for row in csv.DictReader(f)]

    stamps: list[datetime] = []
    with (data / "azure_llm_inference_trace_2023" / "AzureLLMInferenceTrace_conv.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            stamps.append(datetime.fromisoformat(row["TIMESTAMP"][:26]))
    t0 = stamps[0]
    azure_ms = [round((s - t0).total_seconds() * 1000) for s in stamps]

    mooncake = [int(r["input_length"]) for r in _jsonl(data / "mooncake_traces" / "conversation_trace.jsonl")]
    return Sources(
        banking={k: _dedup(v) for k, v in sorted(banking.items())},
        clinc={k: _dedup(v) for k, v in sorted(clinc.items())},
        clinc_domains=domains,
        clinc_oos=_dedup([t for t, _ in clinc_raw["oos_train"]]),
        mt_bench=_jsonl(data / "mt_bench" / "question.jsonl"),
        mt_refs=mt_refs,
        arena=_jsonl(data / "arena_hard" / "question.jsonl"),
        gsm8k=gsm8k,
        mmlu=mmlu,
        azure_ms=azure_ms,
        mooncake_inputs=mooncake,
    )


# ----------------------------------------------------------------------------------------------------------
# FAQ sampling: Zipf over intents, Zipf over the wordings of an intent, surface noise on the text
# ----------------------------------------------------------------------------------------------------------


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (rank + 1) ** s for rank in range(n)]


def surface_variant(text: str, rng: random.Random) -> str:
    """What people type differently without asking anything different: case, spaces, end punctuation."""
    if rng.random() < 0.55:
        return text
    out = text
    for op in rng.sample(("lower", "capital", "strip_end", "add_q", "spaces"), k=rng.choice((1, 1, 2))):
        if op == "lower":
            out = out.lower()
        elif op == "capital":
            out = out[:1].upper() + out[1:]
        elif op == "strip_end":
            out = out.rstrip(" .?!")
        elif op == "add_q":
            out = out.rstrip(" .?!") + rng.choice(("?", "??", " ?", "."))
        elif op == "spaces":
            words = out.split(" ")
            if len(words) > 2:
                i = rng.randrange(1, len(words))
                words[i] = " " + words[i]
            out = " ".join(words) + rng.choice(("", " ", "\n"))
    if normalize_text(out) != normalize_text(text):  # a variant must stay the same question
        raise AssertionError(f"variant changed meaning: {text!r} -> {out!r}")
    return out


@dataclass
class FaqSampler:
    tenant: FaqTenant
    intents: dict[str, list[str]]
    oos: list[str]
    rng: random.Random
    order: list[str] = field(init=False)
    weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.order = sorted(self.intents)
        self.rng.shuffle(self.order)  # popularity rank of each intent
        self.weights = _zipf_weights(len(self.order), self.tenant.intent_zipf)
        for texts in self.intents.values():
            self.rng.shuffle(texts)  # popularity rank of each wording
        self.oos = list(self.oos)
        self.rng.shuffle(self.oos)

    def draw(self) -> tuple[str, str]:
        """(intent, text as typed)."""
        if self.oos and self.rng.random() < self.tenant.oos_rate:
            return "oos", surface_variant(self.oos.pop(), self.rng)
        intent = self.rng.choices(self.order, weights=self.weights)[0]
        texts = self.intents[intent]
        text = self.rng.choices(texts, weights=_zipf_weights(len(texts), self.tenant.wording_zipf))[0]
        return intent, surface_variant(text, self.rng)


# ----------------------------------------------------------------------------------------------------------
# Text written for this workload: assistant replies and short follow-ups in the long histories
# ----------------------------------------------------------------------------------------------------------

BANK_SENTENCES = (
    "In most cases this is resolved within one to two business days, and the app sends a notification as "
    "soon as the status changes.",
    "You can follow the current status under Account, then Activity, where every item shows whether it is "
    "pending, completed or reverted.",
    "If anything looks unfamiliar, freeze the card from the Cards tab first; you can unfreeze it at any time "
    "and nothing is lost.",
    "Pending items are not final: the merchant or the other bank can still change the amount before it "
    "settles, which is why the figure may move slightly.",
    "Fees, if any apply, are always shown before you confirm, and the full breakdown is available on the "
    "receipt of each transaction.",
    "For security reasons I cannot see your full card number or PIN, and nobody from Acme Bank will ever "
    "ask you for them.",
    "Transfers in the same currency usually arrive within a few hours, while international transfers can "
    "take up to five working days depending on the receiving bank.",
    "Exchange rates follow the interbank rate during market hours, with a small markup at weekends when the "
    "markets are closed.",
    "If the problem is still there after that, a support agent can look at your account directly in the "
    "in-app chat, usually within a few minutes.",
    "Please make sure the app is updated to the latest version, because several of these screens changed "
    "recently and older versions show outdated information.",
    "Top-ups by card are instant in most cases, but top-ups by bank transfer depend on the sending bank and "
    "can take a working day.",
    "Your identity verification protects both you and us, and it usually completes within ten minutes once "
    "the photos are clear and the document is valid.",
    "When a card payment is declined, the most common reasons are a frozen card, an exceeded limit, or a "
    "merchant that does not accept this card type.",
    "Refunds from merchants normally take five to ten days to appear, because the merchant has to start "
    "them and the card network has to process them.",
    "You can change this setting yourself in the app under Settings, then Security, and the change applies "
    "immediately.",
    "A replacement card is free once a year, and it is shipped to the address on your profile within three "
    "to five working days.",
    "Cash withdrawals are free up to the monthly allowance shown in your plan, after which a small fee is "
    "charged per withdrawal.",
    "I have noted this in the conversation so the next agent does not have to ask you the same questions "
    "again.",
)
BANK_STEPS = (
    "open the app and tap Cards", "choose the card concerned", "tap the three dots in the top corner",
    "select Report a problem", "follow the short checklist", "confirm with your passcode",
    "check the status under Activity", "contact us in chat if it does not update within a day",
)
GLOBEX_SENTENCES = (
    "Opening hours, prices and availability change often, so it is worth checking again on the day itself.",
    "I can set a reminder for this if you tell me when you would like to be notified.",
    "Traffic and weather can change the picture quickly, so I will use the latest data available when you "
    "ask again.",
    "Most airlines let you check the flight status and change a booking in their app up to a few hours "
    "before departure.",
    "For reservations, booking a day or two ahead is usually enough on weekdays, but Friday and Saturday "
    "evenings fill up faster.",
    "If you share your location I can narrow this down to options within a short drive or walk.",
    "Conversions use the current standard rates, and I round the result to two decimals unless you ask "
    "otherwise.",
    "Your calendar and lists stay on your account, and you can ask me to change or undo any update I made.",
    "Car maintenance intervals depend on the model and how you drive, so the owner's manual is the best "
    "reference, but the usual guidance is below.",
    "Entry rules and vaccination requirements differ by country and can change at short notice, so please "
    "confirm them with the official government site before you travel.",
    "If this is urgent, calling the provider directly is usually faster than writing to them.",
    "Here is a short summary of what I found, and I can go into more detail on any part of it.",
    "Prices shown are estimates based on recent data and may differ slightly from what you pay at the "
    "counter.",
    "I have updated the list, and you can ask me to read it back or share it at any time.",
    "Many people find it easiest to split this into two steps, so I will start with the first one.",
)
GLOBEX_STEPS = (
    "check the details in your booking confirmation", "compare the two closest options",
    "allow some extra time for traffic", "keep the receipt in case you need it later",
    "set a reminder the day before", "confirm the final choice with everyone involved",
)
FOLLOW_UPS = (
    "ok thanks", "that didn't work", "still nothing", "hmm, ok. and another thing", "thanks, that helps",
    "sorry, one more question", "I tried that already", "got it", "can you explain that again more simply?",
    "is there anything else I should check?", "alright",
)
SESSION_WRAP_UPS = (
    "Thanks. Can you summarize what we covered in three bullet points?",
    "Great, what was the first thing you told me to do again?",
    "ok, so what should I do right now?",
    "Can you give me the short version of all that?",
)


def humanize(intent: str) -> str:
    return intent.replace("_", " ")


def templated_reply(intent: str, tenant: str, rng: random.Random, lo: int = 80, hi: int = 200) -> str:
    """An assistant turn of lo..hi words on the topic of `intent`."""
    bank = tenant != "globex-assistant"
    sentences = BANK_SENTENCES if bank else GLOBEX_SENTENCES
    steps = BANK_STEPS if bank else GLOBEX_STEPS
    topic = humanize(intent)
    opener = rng.choice((
        f"Thanks for your message about {topic}.", f"Happy to help with your question on {topic}.",
        f"I understand, {topic} questions come up a lot and here is what usually applies.",
        f"Let me explain how {topic} works here.",
    ))
    target = rng.randint(lo, hi)
    parts = [opener]
    pool = list(sentences)
    rng.shuffle(pool)
    words = len(opener.split())
    if rng.random() < 0.4:
        chosen = [steps[i] for i in sorted(rng.sample(range(len(steps)), k=rng.randint(3, 5)))]
        block = "Here is what to do:\n" + "\n".join(f"{i}. {s.capitalize()}." for i, s in enumerate(chosen, 1))
        parts.append(block)
        words += len(block.split())
    while words < target and pool:
        s = pool.pop()
        if words + len(s.split()) > hi:
            continue
        parts.append(s)
        words += len(s.split())
    parts.append(rng.choice(("Is there anything else I can help you with?", "Let me know if that solves it.",
                             "I hope this helps.")))
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Tools for the histories that call them (OpenAI function-tool schema)
# ----------------------------------------------------------------------------------------------------------


def _tool(name: str, description: str, props: dict[str, Any], required: Sequence[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": list(required)}}}


ACME_TOOLS: tuple[dict[str, Any], ...] = (
    _tool("get_card_status", "Delivery and activation status of one of the customer's cards.",
          {"card_id": {"type": "string"}}, ["card_id"]),
    _tool("list_transactions", "The customer's recent transactions, newest first.",
          {"days": {"type": "integer", "minimum": 1, "maximum": 90},
           "status": {"type": "string", "enum": ["any", "pending", "declined", "reverted"]}}, ["days"]),
)
GLOBEX_TOOLS: tuple[dict[str, Any], ...] = (
    _tool("get_flight_status", "Live status of a flight.", {"flight_number": {"type": "string"},
                                                           "date": {"type": "string", "format": "date"}},
          ["flight_number"]),
    _tool("get_weather", "Forecast for a city.", {"city": {"type": "string"}, "days": {"type": "integer"}},
          ["city"]),
)


def _call_id(rng: random.Random) -> str:
    return "call_" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(24))


def tool_exchange(tenant: str, rng: random.Random, parallel: bool) -> list[ChatMessage]:
    """An assistant turn that calls one or two tools, their results (ids matching) and the answer."""
    if tenant == "acme-bank":
        calls = [ToolCall(id=_call_id(rng), name="get_card_status",
                          arguments=json.dumps({"card_id": f"card_{rng.randint(1000, 9999)}"}))]
        results = [json.dumps({"status": rng.choice(["shipped", "in_transit", "delivered"]),
                               "shipped_on": f"2024-05-{rng.randint(1, 28):02d}",
                               "carrier": "Royal Mail", "eta_working_days": rng.randint(1, 4)})]
        if parallel:
            calls.append(ToolCall(id=_call_id(rng), name="list_transactions",
                                  arguments=json.dumps({"days": 14, "status": "any"})))
            results.append(json.dumps({"transactions": [
                {"merchant": rng.choice(["TFL Travel", "Tesco", "Amazon EU", "Uber"]),
                 "amount": round(rng.uniform(2, 120), 2), "currency": rng.choice(["GBP", "EUR"]),
                 "status": rng.choice(["pending", "pending", "completed", "reverted"]), "days_ago": rng.randint(0, 14)}
                for _ in range(rng.randint(8, 30))]}))
        intent = "card_arrival"
    else:
        calls = [ToolCall(id=_call_id(rng), name="get_flight_status", arguments=json.dumps(
            {"flight_number": f"{rng.choice(['BA', 'LH', 'UA', 'AF'])}{rng.randint(100, 999)}"}))]
        results = [json.dumps({"status": rng.choice(["on_time", "delayed", "boarding"]),
                               "delay_minutes": rng.choice([0, 0, 25, 70]), "gate": f"B{rng.randint(1, 40)}"})]
        if parallel:
            city = rng.choice(["Lisbon", "Chicago", "Osaka", "Berlin"])
            calls.append(ToolCall(id=_call_id(rng), name="get_weather", arguments=json.dumps({"city": city,
                                                                                             "days": 2})))
            results.append(json.dumps({"city": city, "forecast": [
                {"day": d, "high_c": rng.randint(8, 30), "rain_chance": rng.randint(0, 90)} for d in (1, 2)]}))
        intent = "flight_status"
    out = [ChatMessage(role="assistant", content="", tool_calls=tuple(calls))]
    out += [ChatMessage(role="tool", tool_call_id=c.id, content=r) for c, r in zip(calls, results, strict=True)]
    out.append(ChatMessage(role="assistant", content=templated_reply(intent, tenant, rng, 60, 120)))
    return out


# ----------------------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------------------

ROUTINE_HINT: dict[str, TaskType] = {"classification": "classification", "extraction": "extraction",
                                     "summarization": "summarization", "drafting": "drafting"}
MT_HINT: dict[str, TaskType] = {"coding": "code", "math": "reasoning", "reasoning": "reasoning",
                                "writing": "drafting", "extraction": "extraction", "roleplay": "creative"}
MONEY = re.compile(r"\d|£|\$|€|\beuros?\b|\bpounds?\b|\bdollars?\b|\b(GBP|USD|EUR)\b", re.IGNORECASE)


@dataclass
class Draft:
    workload: str
    kind: str  # sub-kind for the doc, e.g. "faq/exact", "routine/classification"
    tenant: str
    messages: list[ChatMessage]
    tags: dict[str, str]
    model: str | None = None
    temperature: float | None = 0.0
    max_tokens: int | None = None
    cache_policy: str = "default"
    task_hint: TaskType | None = None
    tools: tuple[dict[str, Any], ...] = ()
    response_format: dict[str, Any] | None = None
    intent: str | None = None


class Builder:
    def __init__(self, src: Sources, seed: int) -> None:
        self.src = src
        self.seed = seed
        self.rng = random.Random(seed)
        globex_intents = [i for d in GLOBEX_DOMAINS for i in src.clinc_domains[d]]
        initech_intents = [i for d in INITECH_DOMAINS for i in src.clinc_domains[d]]
        self.tenant_intents: dict[str, dict[str, list[str]]] = {
            "acme-bank": {k: list(v) for k, v in src.banking.items()},
            "globex-assistant": {k: list(src.clinc[k]) for k in globex_intents},
            "initech-cards": {k: list(src.clinc[k]) for k in initech_intents},
        }
        self.samplers = {
            t.name: FaqSampler(t, self.tenant_intents[t.name],
                               src.clinc_oos if t.oos_rate else [], random.Random(f"{seed}/faq/{t.name}"))
            for t in FAQ_TENANTS
        }
        self.tenants = {t.name: t for t in FAQ_TENANTS}
        self.routine_seen: list[Draft] = []

    # -- FAQ -------------------------------------------------------------------------------------------------

    def faq(self, tenant_name: str, workload: str = "faq") -> Draft:
        t = self.tenants[tenant_name]
        intent, text = self.samplers[tenant_name].draw()
        return Draft(workload, "faq", t.name, [ChatMessage(role="system", content=t.system),
                                                ChatMessage(role="user", content=text)],
                     dict(t.tags), max_tokens=t.max_tokens, intent=intent)

    def faq_tenant(self) -> str:
        return self.rng.choices([t.name for t in FAQ_TENANTS], weights=[t.share for t in FAQ_TENANTS])[0]

    # -- routine ---------------------------------------------------------------------------------------------

    def _texts(self, tenant: str) -> tuple[str, str]:
        intents = self.tenant_intents[tenant]
        intent = self.rng.choice(sorted(intents))
        return intent, self.rng.choice(intents[intent])

    def routine(self, kind: str, tenant: str) -> Draft:
        rng = self.rng
        if rng.random() < 0.05 and self.routine_seen:  # a job resubmitted after a timeout: same prompt, new id
            prev = rng.choice(self.routine_seen)
            return Draft(prev.workload, prev.kind + "/resubmitted", prev.tenant, list(prev.messages), dict(prev.tags),
                         prev.model, prev.temperature, prev.max_tokens, prev.cache_policy, prev.task_hint, prev.tools,
                         prev.response_format)
        make: dict[str, Callable[[str], Draft]] = {
            "classification": self._classification, "extraction": self._extraction,
            "summarization": self._summarization, "drafting": self._drafting,
        }
        d = make[kind](tenant)
        if rng.random() < 0.2:
            d.task_hint = ROUTINE_HINT[kind]
        self.routine_seen.append(d)
        return d

    def _classification(self, tenant: str, workload: str = "routine") -> Draft:
        rng = self.rng
        _, text = self._texts(tenant)
        labels = sorted(self.tenant_intents[tenant])
        coarse = ("travel, dining, car, home, work, small talk or other" if tenant == "globex-assistant"
                  else "cards, payments, transfers, top-ups, fees, account, security or other")
        style = rng.choice(("labels", "coarse", "coarse", "sentiment"))
        if style == "labels":
            prompt = ("Classify the intent of this customer message. Answer with exactly one label from this list: "
                      f"{', '.join(labels)}.\n\nMessage: {text}")
            max_tokens = 12
        elif style == "coarse":
            prompt = (f"Which category does this support message belong to: {coarse}? Reply with the category "
                      f"only.\n\nMessage: \"{text}\"")
            max_tokens = 5
        else:
            prompt = f"Label the sentiment of this customer message as positive, neutral or negative: {text}"
            max_tokens = 3
        return Draft(workload, f"{workload}/classification", tenant, [ChatMessage(role="user", content=prompt)],
                     {"team": "analytics", "feature": "intent-tagging"}, max_tokens=max_tokens)

    def _extraction(self, tenant: str) -> Draft:
        rng = self.rng
        rf: dict[str, Any] | None = None
        if tenant == "globex-assistant":
            _, text = self._texts(tenant)
            prompt = ("Extract the city, date and time mentioned in this request as JSON with keys city, date and "
                      f"time (null when missing): {text}")
            rf = {"type": "json_object"}
        else:
            pool = [t for v in self.tenant_intents[tenant].values() for t in v if MONEY.search(t)]
            text = rng.choice(sorted(pool))
            if rng.random() < 0.5:
                prompt = (f"Extract the amount and currency from: {text}\nReturn JSON "
                          '{"amount": number or null, "currency": ISO 4217 code or null}.')
                rf = {"type": "json_object"}
            else:
                prompt = ("Pull out every amount, currency, date and card or account type mentioned in the message "
                          f"below, as a JSON list of objects with keys kind and value.\n\n{text}")
        return Draft("routine", "routine/extraction", tenant, [ChatMessage(role="user", content=prompt)],
                     {"team": "analytics", "feature": "field-extraction"}, max_tokens=120, response_format=rf)

    def _summarization(self, tenant: str) -> Draft:
        rng = self.rng
        intents = self.tenant_intents[tenant]
        if rng.random() < 0.5:
            lines: list[str] = []
            topics = rng.sample(sorted(intents), k=rng.randint(1, 2))  # one issue, sometimes a second one
            for turn in range(rng.randint(2, 4)):
                intent = topics[min(turn, len(topics) - 1)]
                text = rng.choice(intents[intent])
                lines.append(f"Customer: {text}")
                lines.append(f"Agent: {templated_reply(intent, tenant, rng, 25, 60)}")
            prompt = "Summarize this support conversation in two sentences for the ticket log:\n\n" + "\n".join(lines)
        else:
            picked = [rng.choice(intents[rng.choice(sorted(intents))]) for _ in range(rng.randint(5, 10))]
            prompt = ("Summarize the main themes of these customer messages received this morning, in at most "
                      "three bullet points:\n" + "\n".join(f"- {t}" for t in picked))
        return Draft("routine", "routine/summarization", tenant, [ChatMessage(role="user", content=prompt)],
                     {"team": "support-ops", "feature": "ticket-summary"}, max_tokens=200)

    def _drafting(self, tenant: str) -> Draft:
        rng = self.rng
        _, text = self._texts(tenant)
        if rng.random() < 0.6:
            prompt = ("Draft a short, friendly reply to this customer message. Keep it under 80 words.\n\n"
                      f"Customer: {text}")
        else:
            prompt = (f"Write a polite email to a customer who wrote: \"{text}\". Thank them, explain that a "
                      "specialist will review the case within two working days, and tell them what to do meanwhile.")
        return Draft("routine", "routine/drafting", tenant, [ChatMessage(role="system", content=AGENT_ASSIST_SYSTEM),
                                                            ChatMessage(role="user", content=prompt)],
                     {"team": "support-ops", "feature": "reply-assist"}, temperature=0.3, max_tokens=300)

    # -- hard ------------------------------------------------------------------------------------------------

    def hard_pool(self) -> list[Draft]:
        rng = random.Random(f"{self.seed}/hard")
        src = self.src
        tags = {"team": "engineering", "feature": "copilot"}

        def req(kind: str, messages: list[ChatMessage], hint: TaskType | None, team: str = "engineering",
                feature: str = "copilot") -> Draft:
            d = Draft("hard", kind, "hooli-copilot", [ChatMessage(role="system", content=HOOLI_SYSTEM), *messages],
                      {**tags, "team": team, "feature": feature}, temperature=0.2, max_tokens=2048)
            d.task_hint = hint if (hint is not None and rng.random() < 0.4) else None
            return d

        out: list[Draft] = []
        with_refs = [q for q in src.mt_bench if int(q["question_id"]) in src.mt_refs]
        two_turn = rng.sample(with_refs, 8)
        used = {int(q["question_id"]) for q in two_turn}
        for q in two_turn:
            ref = src.mt_refs[int(q["question_id"])]
            out.append(req("hard/mt_bench_2turn", [ChatMessage(role="user", content=q["turns"][0]),
                                                   ChatMessage(role="assistant", content=ref[0]),
                                                   ChatMessage(role="user", content=q["turns"][1])],
                           MT_HINT.get(q["category"])))
        singles = rng.sample([q for q in src.mt_bench if int(q["question_id"]) not in used], 30)
        for q in singles:
            team = "product" if q["category"] in ("writing", "roleplay", "humanities") else "engineering"
            out.append(req("hard/mt_bench", [ChatMessage(role="user", content=q["turns"][0])],
                           MT_HINT.get(q["category"]), team))
        arena = rng.sample([a for a in src.arena if len(a["turns"][0]["content"]) <= 5000], 34)
        for a in arena:
            out.append(req("hard/arena_hard", [ChatMessage(role="user", content=a["turns"][0]["content"])], None))
        for p in rng.sample(src.gsm8k, 18):
            out.append(req("hard/gsm8k", [ChatMessage(role="user", content=p)], "reasoning", "learning",
                           "homework-help"))
        for _, p in rng.sample(src.mmlu, 18):
            out.append(req("hard/mmlu", [ChatMessage(role="user", content=p)], None, "learning", "homework-help"))
        rng.shuffle(out)
        return out

    # -- long histories --------------------------------------------------------------------------------------

    def long_pool(self, n: int) -> list[Draft]:
        rng = random.Random(f"{self.seed}/long")
        counter = TokenCounter()
        plan = (["acme-bank"] * 30 + ["globex-assistant"] * 20 + ["initech-cards"] * 8 + ["hooli-copilot"] * 14)
        assert len(plan) == n, (len(plan), n)
        tool_sessions = {0: False, 1: True, 2: False, 3: True, 30: False, 31: True}  # index -> parallel calls
        out: list[Draft] = []
        for i, tenant in enumerate(plan):
            target = min(max(rng.choice(self.src.mooncake_inputs), 1200), 8000)  # tokens of real long contexts
            if tenant == "hooli-copilot":
                out.append(self._copilot_session(rng, counter, target))
            else:
                out.append(self._support_session(tenant, rng, counter, target, tool_sessions.get(i)))
        rng.shuffle(out)
        return out

    def _support_session(self, tenant: str, rng: random.Random, counter: TokenCounter, target: int,
                         tools: bool | None) -> Draft:
        t = self.tenants[tenant]
        intents = self.tenant_intents[tenant]
        topics = rng.sample(sorted(intents), k=rng.randint(2, 4))
        turns: list[ChatMessage] = []
        tool_at = rng.randint(2, 6) if tools is not None else -1
        exchange = 0
        while True:
            intent = topics[min(exchange * len(topics) // 8, len(topics) - 1)]
            follow_up = exchange > 0 and rng.random() < 0.25
            user = rng.choice(FOLLOW_UPS) if follow_up else rng.choice(intents[intent])
            turns.append(ChatMessage(role="user", content=user))
            if exchange == tool_at:
                turns += tool_exchange(tenant, rng, bool(tools))
            else:
                turns.append(ChatMessage(role="assistant", content=templated_reply(intent, tenant, rng, 120, 260)))
            exchange += 1
            tokens = counter.count_messages(turns, COUNT_MODEL)
            if len(turns) >= 7 and (tokens >= target or len(turns) >= 27):
                break
        final = rng.choice(SESSION_WRAP_UPS) if rng.random() < 0.3 else rng.choice(intents[rng.choice(topics)])
        turns.append(ChatMessage(role="user", content=final))
        return Draft("long_history", "long_history/support" + ("+tools" if tools is not None else ""), tenant,
                     [ChatMessage(role="system", content=t.system), *turns],
                     {**t.tags, "feature": "help-chat-session"} if tenant == "acme-bank" else dict(t.tags),
                     max_tokens=t.max_tokens, tools=(ACME_TOOLS if tenant == "acme-bank" else GLOBEX_TOOLS)
                     if tools is not None else ())

    def _copilot_session(self, rng: random.Random, counter: TokenCounter, target: int) -> Draft:
        with_refs = [q for q in self.src.mt_bench if int(q["question_id"]) in self.src.mt_refs]
        rng.shuffle(with_refs)
        turns: list[ChatMessage] = []
        for q in with_refs:
            ref = self.src.mt_refs[int(q["question_id"])]
            for u, a in zip(q["turns"], ref, strict=False):
                turns += [ChatMessage(role="user", content=u), ChatMessage(role="assistant", content=a)]
            tokens = counter.count_messages(turns, COUNT_MODEL)
            if len(turns) >= 8 and (tokens >= target or len(turns) >= 28):
                break
        if rng.random() < 0.5:
            final = rng.choice(SESSION_WRAP_UPS)
        else:
            final = rng.choice([q for q in self.src.mt_bench if q["category"] in ("stem", "humanities")])["turns"][0]
        turns.append(ChatMessage(role="user", content=final))
        return Draft("long_history", "long_history/copilot", "hooli-copilot",
                     [ChatMessage(role="system", content=HOOLI_SYSTEM), *turns],
                     {"team": "engineering", "feature": "copilot"}, temperature=0.2, max_tokens=2048)

    # -- the stream ------------------------------------------------------------------------------------------

    @staticmethod
    def faq_key(d: Draft) -> tuple[str, ...] | None:
        """What makes two FAQ-shaped drafts exact repeats of each other (None for everything else)."""
        if d.intent is None:
            return None
        return (d.tenant, d.model or "", d.cache_policy, normalize_text(d.messages[-1].content))

    def _pull_popular_forward(self, drafts: list[Draft]) -> None:
        """A question asked 3+ times first appears in the first half, so its repeats have something to hit.

        The first occurrence trades places with an earlier one-off FAQ question; nothing else moves.
        """
        counts = Counter(k for k in map(self.faq_key, drafts) if k is not None)
        limit = len(drafts) // 2
        singles = [i for i, d in enumerate(drafts[:limit]) if (k := self.faq_key(d)) is not None and counts[k] == 1]
        self.rng.shuffle(singles)
        seen: set[tuple[str, ...]] = set()
        for i, d in enumerate(drafts):
            k = self.faq_key(d)
            if k is None or k in seen:
                continue
            seen.add(k)
            if counts[k] >= 3 and i >= limit:
                j = singles.pop()
                drafts[i], drafts[j] = drafts[j], drafts[i]

    def build(self) -> list[LLMRequest]:
        rng = self.rng
        slots: list[str] = [w for w, n in COUNTS.items() for _ in range(n)]
        rng.shuffle(slots)
        hard = self.hard_pool()
        longs = self.long_pool(COUNTS["long_history"])
        routine_kinds = ["classification"] * 50 + ["extraction"] * 40 + ["summarization"] * 40 + ["drafting"] * 50
        assert len(routine_kinds) == COUNTS["routine"]
        rng.shuffle(routine_kinds)
        pinned_kinds = ["ivr"] * 20 + ["classify"] * 16
        assert len(pinned_kinds) == COUNTS["pinned"]
        rng.shuffle(pinned_kinds)

        drafts: list[Draft] = []
        for slot in slots:
            if slot == "faq":
                d = self.faq(self.faq_tenant())
            elif slot == "routine":
                tenant = rng.choices(["acme-bank", "globex-assistant", "initech-cards"], weights=[55, 30, 15])[0]
                d = self.routine(routine_kinds.pop(), tenant)
            elif slot == "hard":
                d = hard.pop()
            elif slot == "long_history":
                d = longs.pop()
            else:
                if pinned_kinds.pop() == "ivr":  # a legacy IVR integration that hard-codes the large model
                    d = self.faq("acme-bank", workload="pinned")
                    d.kind, d.model, d.tags = "pinned/faq", "gpt-4o", {**d.tags, "feature": "ivr-bot"}
                else:  # a batch tagger that pins the small model
                    d = self._classification("globex-assistant", workload="pinned")
                    d.model, d.tags = "gpt-4o-mini", {**d.tags, "feature": "nightly-tagger"}
            drafts.append(d)

        # Cache policies as producers set them: authenticated help-chat sessions must not be stored, a
        # "live answers" feature skips lookups. Picked among FAQ requests, so some are repeats the cache must
        # leave alone.
        acme_faq = [d for d in drafts if d.workload == "faq" and d.tenant == "acme-bank"]
        for d in rng.sample(acme_faq, 8):
            d.cache_policy, d.tags = "no-store", {**d.tags, "feature": "authenticated-chat"}
        globex_faq = [d for d in drafts if d.workload == "faq" and d.tenant == "globex-assistant"
                      and d.cache_policy == "default"]
        for d in rng.sample(globex_faq, 6):
            d.cache_policy, d.tags = "no-cache", {**d.tags, "feature": "live-answers"}

        self._pull_popular_forward(drafts)
        start = rng.randrange(0, len(self.src.azure_ms) - len(drafts))
        window = self.src.azure_ms[start:start + len(drafts)]
        self.drafts = drafts
        requests: list[LLMRequest] = []
        for i, (d, t_ms) in enumerate(zip(drafts, window, strict=True)):
            tags = {**d.tags, WORKLOAD_TAG: d.workload, ARRIVAL_TAG: str(t_ms - window[0])}
            row: dict[str, Any] = {
                "id": f"demo-{i + 1:06d}", "tenant": d.tenant,
                "messages": [m.model_dump(mode="json", exclude_defaults=True) for m in d.messages],
                "model": d.model, "sampling": {"temperature": d.temperature}, "max_tokens": d.max_tokens,
                "cache": {"policy": d.cache_policy}, "task_hint": d.task_hint, "tools": list(d.tools),
                "response_format": d.response_format, "tags": tags, "created_at": None,
            }
            requests.append(LLMRequest.model_validate(row))
        return requests


# ----------------------------------------------------------------------------------------------------------
# Checks, statistics and the doc
# ----------------------------------------------------------------------------------------------------------


def check(requests: Sequence[LLMRequest], lines: Sequence[str], drafts: Sequence[Draft]) -> None:
    n = len(requests)
    keys = [Builder.faq_key(d) for d in drafts]
    counts = Counter(k for k in keys if k is not None)
    for k, c in counts.items():
        assert c < 3 or keys.index(k) < n // 2, ("popular question first seen late", k)
    assert len({r.id for r in requests}) == n, "ids must be unique"
    mix = Counter(r.tags[WORKLOAD_TAG] for r in requests)
    for w in WORKLOADS:
        lo, hi = MIX_RANGES[w]
        assert lo <= mix[w] / n <= hi, (w, mix[w] / n, (lo, hi))
    for r, line in zip(requests, lines, strict=True):
        assert len(line.encode()) < MAX_MESSAGE_BYTES, r.id
        assert r.created_at is None
        pending: set[str] = set()
        for m in r.messages:
            if m.role == "tool":
                assert m.tool_call_id in pending, (r.id, "tool result without its call")
                pending.discard(m.tool_call_id)
            else:
                assert not pending, (r.id, "tool call without its result")
                pending = {c.id for c in m.tool_calls}
        assert not pending, r.id
        if r.tags[WORKLOAD_TAG] == "long_history":
            turns = sum(1 for m in r.messages if m.role != "system")
            assert 8 <= turns <= 30, (r.id, turns)


def _pct(values: Sequence[int], p: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1)))]


def faq_stats(builder: Builder, requests: Sequence[LLMRequest]) -> dict[str, int]:
    """How each FAQ-shaped request relates to what came before it in the same cache scope."""
    first_raw: dict[tuple[str, str], str] = {}
    seen_intent: set[tuple[str, str]] = set()
    stats: Counter[str] = Counter()
    for d, r in zip(builder.drafts, requests, strict=True):
        if d.intent is None:
            continue
        scope = f"{r.tenant}|{r.model}|{r.cache.policy}"
        raw = r.messages[-1].content
        text = normalize_text(raw)
        if d.intent == "oos":
            stats["out_of_scope"] += 1
        elif (scope, text) in first_raw:
            stats["exact_repeat"] += 1
            stats["exact_repeat_surface_variant"] += raw != first_raw[(scope, text)]
        elif (scope, d.intent) in seen_intent:
            stats["same_intent_reworded"] += 1
        else:
            stats["first_of_intent"] += 1
        first_raw.setdefault((scope, text), raw)
        seen_intent.add((scope, d.intent))
    return dict(stats)


SOURCES_TABLE: tuple[tuple[str, str, str, str], ...] = (
    (
        "BANKING77",
        "acme-bank FAQ questions, routine-task inputs, user turns of acme-bank histories",
        'Casanueva, Temčinas, Gerz, Henderson, Vulić: "Efficient Intent Detection with Dual Sentence '
        'Encoders" (2020); PolyAI, https://github.com/PolyAI-LDN/task-specific-datasets '
        "(`banking_data/train.csv`)",
        "[CC BY 4.0](https://creativecommons.org/licenses/by/4.0/)",
    ),
    (
        "CLINC150 (OOS-eval)",
        "globex-assistant and initech-cards FAQ questions and out-of-scope probes, routine-task inputs, "
        "user turns of their histories",
        'Larson et al.: "An Evaluation Dataset for Intent Classification and Out-of-Scope Prediction" '
        "(EMNLP 2019); https://github.com/clinc/oos-eval (`data/data_full.json`, `data/domains.json`)",
        "[CC BY 3.0](https://creativecommons.org/licenses/by/3.0/)",
    ),
    (
        "MT-Bench questions and GPT-4 reference answers",
        "hard prompts (single and two-turn), copilot histories (user turns and assistant turns)",
        "LMSYS, FastChat: https://github.com/lm-sys/FastChat (`fastchat/llm_judge/data/mt_bench/`); "
        'Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena" (2023)',
        "Apache-2.0",
    ),
    (
        "Arena-Hard-Auto v0.1",
        "hard prompts",
        "LMSYS: https://github.com/lm-sys/arena-hard-auto (`data/arena-hard-v0.1/question.jsonl`); Li et"
        ' al., "From Crowdsourced Data to High-Quality Benchmarks: Arena-Hard and BenchBuilder Pipeline"'
        " (2024)",
        "Apache-2.0",
    ),
    (
        "RouteLLM evaluation prompts: GSM8K, MMLU",
        "hard prompts (math word problems, multiple-choice questions)",
        "LMSYS RouteLLM: https://github.com/lm-sys/RouteLLM (`routellm/evals/`); GSM8K: Cobbe et al. "
        "(2021), OpenAI; MMLU: Hendrycks et al. (2021)",
        "Apache-2.0 (RouteLLM); GSM8K MIT; MMLU MIT",
    ),
    (
        "Azure LLM inference trace 2023",
        "inter-arrival times (`arrival_ms` tag): a contiguous window of the conversation trace",
        "Microsoft Azure, https://github.com/Azure/AzurePublicDataset "
        '(`data/AzureLLMInferenceTrace_conv.csv`); Patel et al., "Splitwise: Efficient generative LLM '
        'inference using phase splitting" (ISCA 2024)',
        "[CC BY 4.0](https://creativecommons.org/licenses/by/4.0/)",
    ),
    (
        "Mooncake traces",
        "target context length of the long histories (sampled `input_length`, clipped to 1,200-8,000 "
        "tokens; the 30-turn cap bounds it first)",
        "Moonshot AI / KVCache.AI, https://github.com/kvcache-ai/Mooncake "
        '(`FAST25-release/traces/conversation_trace.jsonl`); Qin et al., "Mooncake: A KVCache-centric '
        'Disaggregated Architecture for LLM Serving" (FAST 2025)',
        "Apache-2.0",
    ),
)
CHANGES_NOTE = (
    "**Changes made (as CC BY requires us to indicate):** utterances were selected by seeded sampling, some have "
    "altered letter case, spacing or end punctuation, and they are embedded in prompt templates, support-ticket "
    "transcripts and multi-turn conversations written for this workload; the arrival times are offsets from the "
    "first request of the selected window; source texts were otherwise only trimmed of surrounding whitespace. "
    "The system prompts, templates, assistant replies of the support histories, tool definitions and tool "
    "results are original to frugalstream (Apache-2.0). No licensor endorses frugalstream or this use.\n"
)


def render_doc(builder: Builder, requests: Sequence[LLMRequest], gz_bytes: int, raw_bytes: int, seed: int) -> str:
    n = len(requests)
    counter = TokenCounter()
    tokens = [counter.count_messages(r.messages, COUNT_MODEL) for r in requests]
    mix = Counter(r.tags[WORKLOAD_TAG] for r in requests)
    kinds = Counter(d.kind.split("/resubmitted")[0] for d in builder.drafts)
    resubmitted = sum(1 for d in builder.drafts if d.kind.endswith("/resubmitted"))
    what = {
        "faq": "support questions of 3 tenants, Zipf popularity: exact repeats, rewordings, first-timers, "
               "out-of-scope probes; tenant system prompt, temperature 0",
        "routine": "classification, extraction, summarization, reply drafting built from customer messages; "
                   f"mostly unique ({resubmitted} resubmitted jobs)",
        "hard": "MT-Bench (single and two-turn), Arena-Hard, GSM8K, MMLU prompts; all unique",
        "long_history": "8-30 turn support chats and copilot sessions, a few with tool calls; trimming candidates",
        "pinned": "an IVR bot pinned to gpt-4o (same FAQ traffic) and a nightly tagger pinned to gpt-4o-mini",
    }
    lines = [
        "# The demo workload",
        "",
        "`demo_workload.jsonl.gz` is what `frugalstream demo` replays against the `simulated` provider: "
        f"**{n} requests** (`frugalstream.schemas.LLMRequest`, one JSON object per line, "
        f"gzip: {gz_bytes / 1000:.0f} kB, "
        f"{raw_bytes / 1e6:.1f} MB uncompressed), built by `scripts/build_demo_workload.py --seed {seed}` "
        "from the datasets attributed below. Load it with `frugalstream.tools.demo_workload.load_demo_workload()`.",
        "",
        "It is shaped like production traffic rather than a cache showcase: most requests are not repeats, "
        "routine and hard jobs are (almost) unique, and FAQ repeats come from sampling a Zipf-like popularity, "
        "not from planting duplicates. Every request has `created_at: null` (the demo stamps it) and two "
        "demo-only tags: `workload` (the category below) and `arrival_ms` (offset from the first request, "
        "from a contiguous window of the Azure conversation trace; "
        "`frugalstream.tools.demo_workload.arrival_offsets_s` "
        "rescales it to a target duration).",
        "",
        "## Mix",
        "",
        "| workload | requests | share | documented range | input tokens p50 / p90 (o200k) | what it is |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for w in WORKLOADS:
        tk = [t for t, r in zip(tokens, requests, strict=True) if r.tags[WORKLOAD_TAG] == w]
        lo, hi = MIX_RANGES[w]
        lines.append(f"| {w} | {mix[w]} | {mix[w] / n:.1%} | {lo:.0%}-{hi:.0%} | {_pct(tk, 0.5):,} / "
                     f"{_pct(tk, 0.9):,} | {what[w]} |")
    lines.append(f"| **total** | **{n}** | 100% | | {_pct(tokens, 0.5):,} / {_pct(tokens, 0.9):,} | "
                 f"{sum(tokens):,} input tokens in all |")
    lines += ["", "### Inside the categories", "", "| kind | requests |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(kinds.items())]
    if resubmitted:
        lines.append(f"| routine jobs resubmitted with a new id (retries) | {resubmitted} |")

    fs = faq_stats(builder, requests)
    faq_n = sum(v for k, v in fs.items() if k != "exact_repeat_surface_variant")
    lines += [
        "", "### FAQ-shaped requests (faq + the pinned IVR bot), relative to earlier requests in the same scope",
        "", "A scope here is tenant + pinned model + cache policy (system prompt and parameters are fixed per "
        "tenant). \"Exact\" is after the product's normalization (case, whitespace, trailing punctuation); "
        "a same-intent rewording is a semantic-cache *candidate* only: same intent is not always same answer, "
        "and the verifier decides.", "",
        "| relation to earlier traffic | requests | share |", "|---|---:|---:|",
    ]
    for k in ("exact_repeat", "same_intent_reworded", "first_of_intent", "out_of_scope"):
        lines.append(f"| {k.replace('_', ' ')} | {fs.get(k, 0)} | {fs.get(k, 0) / max(faq_n, 1):.1%} |")
    lines.append(f"| (of the exact repeats: typed with different case/spacing/punctuation) | "
                 f"{fs.get('exact_repeat_surface_variant', 0)} | |")
    exact_all = fs.get("exact_repeat", 0)
    first_at: dict[tuple[str, ...], int] = {}
    gaps_s: list[float] = []
    for i, (d, r) in enumerate(zip(builder.drafts, requests, strict=True)):
        key = Builder.faq_key(d)
        if key is None or d.intent == "oos":
            continue
        if key in first_at:
            gaps_s.append((int(r.tags[ARRIVAL_TAG]) - int(requests[first_at[key]].tags[ARRIVAL_TAG])) / 1000)
        else:
            first_at[key] = i
    lines += ["", f"Timing: an exact repeat arrives a median {statistics.median(gaps_s):.0f} s (trace time) after the "
              f"first occurrence (min {min(gaps_s):.1f} s); every question asked 3+ times is first asked in the "
              "first half of the stream, so its repeats can hit rather than only coalesce."]
    with_resubmitted = (exact_all + resubmitted) / n
    lines += ["", f"FAQ exact repeats are {exact_all / n:.1%} of the whole workload, {with_resubmitted:.1%} with the "
              f"{resubmitted} resubmitted routine jobs: the upper bound of what an exact cache can save here "
              "(less the `no-cache`/`no-store` requests it must leave alone); everything else is up to routing, "
              "verified semantic matches and trimming.", ""]

    tenants = Counter(r.tenant for r in requests)
    policies = Counter(r.cache.policy for r in requests)
    pinned = Counter(r.model for r in requests if r.model)
    hints = sum(1 for r in requests if r.task_hint)
    with_tools = [r for r in requests if any(m.tool_calls for m in r.messages)]
    longs = [r for r in requests if r.tags[WORKLOAD_TAG] == "long_history"]
    turns = [sum(1 for m in r.messages if m.role != "system") for r in longs]
    lines += [
        "## Other properties", "",
        f"- Tenants: {', '.join(f'`{t}` {c}' for t, c in sorted(tenants.items()))}.",
        f"- Cache policy: {', '.join(f'`{p}` {c}' for p, c in sorted(policies.items()))}.",
        f"- Pinned `model`: {', '.join(f'`{m}` {c}' for m, c in sorted(pinned.items()))}.",
        f"- `task_hint` set on {hints} requests ({hints / (mix['routine'] + mix['hard']):.0%} of routine and hard "
        "jobs, always the right type, as some producers do); "
        "the classifier decides the rest.",
        f"- Long histories: {min(turns)}-{max(turns)} non-system turns (median {statistics.median(turns):.0f}); "
        f"{len(with_tools)} contain assistant tool calls with their results (ids matching), some with two "
        "parallel calls, and declare the tools they use.",
        "- Sampling: temperature 0 for FAQ, classification, extraction and summarization; 0.3 for reply drafting; "
        "0.2 for the copilot. `max_tokens` is fixed per tenant and feature, as producers set it.",
        "",
        "## Sources and attribution", "",
        "| dataset | used for | authors / source | license |", "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in SOURCES_TABLE),
        "", CHANGES_NOTE.strip(),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)

    builder = Builder(load_sources(args.data), args.seed)
    requests = shape(builder.build())
    lines = [r.model_dump_json() for r in requests]
    for line in lines:  # what we write is exactly what load_demo_workload() will read back
        LLMRequest.model_validate_json(line)
    check(requests, lines, builder.drafts)
    raw = ("\n".join(lines) + "\n").encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    blob = buf.getvalue()
    if len(blob) >= MAX_GZ_BYTES:
        raise SystemExit(f"workload is {len(blob):,} bytes gzipped, the limit is {MAX_GZ_BYTES:,}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    OUT_FILE.write_bytes(blob)
    DOC_FILE.write_text(render_doc(builder, requests, len(blob), len(raw), args.seed) + "\n\n" + doc_section(requests)
                        + "\n", encoding="utf-8")
    mix = Counter(r.tags[WORKLOAD_TAG] for r in requests)
    print(f"{len(requests)} requests, {len(blob):,} bytes gz ({len(raw):,} raw) -> {OUT_FILE.relative_to(ROOT)}")
    print("mix: " + ", ".join(f"{w} {mix[w]} ({mix[w] / len(requests):.1%})" for w in WORKLOADS))
    print(f"doc -> {DOC_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
