"""The demo workload's deferrable share and long repeated prefixes (issue 18), applied to built requests.

    .venv/bin/python scripts/demo_workload_batch.py      # reshapes the shipped file in place (idempotent)

`scripts/build_demo_workload.py` applies `shape` to what it builds; this script applies it to the shipped
`demo_workload.jsonl.gz` as it is, so the rest of the workload stays byte for byte what earlier results used.

What production traffic has and the workload gains:
- the analytics team's pipelines carry a long shared instruction (a labelling or extraction handbook with
  worked examples, well over 1,024 tokens) as their system prompt, the same on every call: provider prompt
  caching reads it from cache after its first use;
- the jobs that are not a person waiting say so: the nightly tagger may take a day (`within_24h`), the
  intent-tagging pipeline an hour (`within_1h`); field extraction feeds a live screen and stays interactive.
"""

from __future__ import annotations

import gzip
import io
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from frugalstream.schemas import ChatMessage, LLMRequest  # noqa: E402

DATA_DIR = ROOT / "services" / "frugalstream" / "tools" / "data"
LATENCY = {"nightly-tagger": "within_24h", "intent-tagging": "within_1h"}
HANDBOOK_FEATURES = ("nightly-tagger", "intent-tagging", "field-extraction")
OPENING = "You are the analytics team's assistant"

_RULES = (
    "Read the whole message before deciding; the first sentence is often a greeting and the request comes later.",
    "Decide on what the customer asks for, not on the words they use: 'my card is gone' is about a lost or "
    "stolen card even though it never says lost.",
    "When a message asks two things, label the one that needs action from us; a thank-you or a complaint about "
    "waiting is never the main intent.",
    "Amounts, dates and merchant names do not change the intent; they are fields for the extraction pipeline.",
    "A message that only reports that something did not work is about that thing: 'the transfer failed' is about "
    "a failed transfer, not about transfers in general.",
    "Questions about how long something takes belong to the step that is slow (delivery, verification, a "
    "pending payment), not to a generic waiting category.",
    "Security first: anything mentioning a stolen phone, a compromised password, an unknown login or a payment "
    "the customer did not make is labelled with the security-related intent even when it also asks something else.",
    "Fees: a charge the customer did not expect is a fee question when a fee was applied and a transaction "
    "question when the amount itself is wrong.",
    "Exchange rates and currency conversions are distinct from fees even when the customer calls the difference "
    "a charge; label by what the customer believes went wrong.",
    "Top-ups are money coming into the account from a card, a bank transfer or cash; transfers are money leaving "
    "it to someone else, including to the customer's own account elsewhere.",
    "Card delivery, card activation and card linking are three different steps; pick the one the customer is "
    "stuck on, and if they say the card never arrived, it is delivery.",
    "Identity verification questions are about documents, photos and the time the check takes; a refused "
    "verification is still a verification question.",
    "Refund requests for a purchase go to the merchant-dispute intent; a refund of one of our own fees is a fee "
    "question.",
    "Out-of-scope messages (weather, jokes, other companies' products) get the label 'other', never the closest "
    "banking intent: a wrong label is worse than 'other'.",
    "Do not guess from the customer's tone; an angry message about a card payment is a card payment message.",
    "If the message is in another language, label it as if it were written in English; do not translate it in "
    "the answer.",
    "Never include personal data in the answer: no names, card numbers, account numbers or addresses, even when "
    "they appear in the message.",
    "Answer with the label alone, in lower case, exactly as it appears in the list, with no explanation, no "
    "quotes and no trailing punctuation.",
    "When the list offers a coarse category set instead of intents, use the same rules at that granularity.",
    "Sentiment, when asked, is about the customer's state at the end of the message: a polite question after a "
    "problem is neutral, a thank-you after a fix is positive, a threat to leave is negative.",
    "For extraction, return exactly the JSON the instruction asks for; use null for anything the message does "
    "not state, and never infer a currency from a country.",
    "Dates are returned as written when they are relative ('yesterday', 'last Friday'); absolute dates are "
    "normalised to ISO 8601 only when the year is stated.",
    "Amounts are numbers without thousands separators; a range ('between 20 and 30') becomes two entries.",
    "Card types are one of debit, credit, virtual or disposable; an account type is current, savings or joint.",
    "Keep the pipeline's output stable across runs: the same message always gets the same label, so prefer the "
    "rule that applies first in this handbook when two rules point to different labels.",
    "Messages from business customers follow the same rules; 'our company card' is a card question and a "
    "payroll transfer is a transfer.",
    "A message that quotes an earlier conversation is labelled by its newest part, written below the quote.",
)
_EXAMPLES = (
    ("I ordered my new card two weeks ago and it still hasn't come, what's going on?", "card_arrival"),
    ("Why was I charged an extra pound when I took money out at the airport?", "cash_withdrawal_charge"),
    ("My top up by bank transfer is still pending since Monday", "pending_top_up"),
    ("there's a payment to a shop in Lisbon I never made", "card_payment_not_recognised"),
    ("Can I change the PIN of my card in the app?", "change_pin"),
    ("The exchange rate I got for my dollar payment looks wrong", "card_payment_wrong_exchange_rate"),
    ("My verification keeps failing because of the photo", "unable_to_verify_identity"),
    ("I sent money to my sister yesterday and she still doesn't have it", "transfer_not_received_by_recipient"),
    ("what's the weather in Madrid tomorrow", "other"),
    ("thanks, all sorted now!", "other"),
    ("How do I add money to my account with Apple Pay?", "apple_pay_or_google_pay"),
    ("Someone logged into my account from a phone I don't own!!", "compromised_card"),
    ("Is there a fee for sending euros to a UK account?", "transfer_fee_charged"),
    ("I want to close my account and move everything elsewhere", "terminate_account"),
    ("my disposable virtual card was declined at checkout", "virtual_card_not_working"),
    ("Can I get a refund for the card delivery fee? It arrived late", "card_delivery_estimate"),
)


def handbook(feature: str) -> str:
    """The pipeline's instruction: the same text on every call of the feature (what prompt caching reads)."""
    task = ("extract fields from customer messages" if feature == "field-extraction"
            else "label customer messages with their intent")
    rules = "\n".join(f"{i}. {rule}" for i, rule in enumerate(_RULES, 1))
    examples = "\n".join(f"Message: {text}\nLabel: {label}" for text, label in _EXAMPLES)
    return (f"{OPENING}; your job is to {task} for the Acme group's support "
            "operations. Follow the handbook below exactly; it is applied to every message of the pipeline, so "
            f"consistency matters more than anything else.\n\nHandbook\n{rules}\n\nWorked examples\n{examples}\n\n"
            "Apply the handbook to the message in the next turn.")


def has_handbook(r: LLMRequest) -> bool:
    return r.messages[0].role == "system" and r.messages[0].content.startswith(OPENING)


def shape(requests: Sequence[LLMRequest]) -> list[LLMRequest]:
    """The analytics pipelines get their handbook as system prompt; the jobs that can wait say how long."""
    out = []
    for r in requests:
        feature = r.tags.get("feature", "")
        if feature not in HANDBOOK_FEATURES or has_handbook(r):
            out.append(r)
            continue
        messages = (ChatMessage(role="system", content=handbook(feature)), *r.messages)
        out.append(r.model_copy(update={"messages": messages, "latency_class": LATENCY.get(feature, "interactive")}))
    return out


def doc_section(requests: Sequence[LLMRequest]) -> str:
    classes = Counter(r.latency_class for r in requests)
    with_handbook = sum(1 for r in requests if has_handbook(r))
    by_feature = Counter(r.tags.get("feature", "") for r in requests if has_handbook(r))
    return "\n".join([
        "## Deferrable share and repeated prefixes", "",
        f"- Latency classes: {', '.join(f'`{c}` {n}' for c, n in sorted(classes.items()))}: the nightly tagger "
        "may take a day, the intent-tagging pipeline an hour; they go through the provider's batch API.",
        f"- {with_handbook} requests ({', '.join(f'`{f}` {n}' for f, n in sorted(by_feature.items()))}) carry "
        "their pipeline's handbook (rules and worked examples, over 1,024 tokens) as system prompt, the same on "
        "every call, as production pipelines do: a repeated long prefix the provider's prompt cache reads.",
        "- Added by `scripts/demo_workload_batch.py` to the requests built above (the handbook text is original "
        "to frugalstream).",
    ])


def write(requests: Sequence[LLMRequest], gz_path: Path) -> int:
    raw = ("\n".join(r.model_dump_json() for r in requests) + "\n").encode()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    gz_path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def main() -> int:
    gz_path, doc_path = DATA_DIR / "demo_workload.jsonl.gz", DATA_DIR / "DEMO_WORKLOAD.md"
    lines = gzip.decompress(gz_path.read_bytes()).decode().splitlines()
    requests = shape([LLMRequest.model_validate_json(line) for line in lines if line.strip()])
    size = write(requests, gz_path)
    doc = doc_path.read_text(encoding="utf-8").split("## Deferrable share and repeated prefixes")[0].rstrip()
    doc_path.write_text(doc + "\n\n" + doc_section(requests) + "\n", encoding="utf-8")
    print(f"{len(requests)} requests, {size:,} bytes gz -> {gz_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
