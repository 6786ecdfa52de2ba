"""A job part's plan: which content is reused from the store, which merges into a near-duplicate, and which
distinct items go into which packed call.

The plan is persisted before the first call, so a redelivered job rebuilds exactly the same calls (same
packs, same deterministic usage ids) and skips the ones the store says are done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from frugalstream.llm.cache_keys import normalize_text
from frugalstream.schemas import SummarizeJob

PROMPT_VERSION = "pack-v1"


def content_hash(text: str) -> str:
    return hashlib.blake2b(normalize_text(text).encode(), digest_size=12).hexdigest()


def job_key(job: SummarizeJob) -> str:
    """Identifies this exact part: a producer reusing a job id with other content gets a new key."""
    return hashlib.blake2b(job.model_dump_json().encode(), digest_size=12).hexdigest()


def reuse_scope(tenant: str, instruction: str, max_output_tokens: int, model: str) -> str:
    """A summary is reused only for the same tenant, instruction, output budget, model and prompt version."""
    payload = json.dumps([tenant, instruction, max_output_tokens, model, PROMPT_VERSION])
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


@dataclass
class Plan:
    packs: list[list[str]]
    reuse: dict[str, tuple[str, str]] = field(default_factory=dict)  # digest -> (item id, job id) stored
    near: dict[str, str] = field(default_factory=dict)  # member digest -> representative digest

    def to_json(self) -> dict[str, Any]:
        return {"packs": self.packs, "reuse": {d: list(v) for d, v in self.reuse.items()}, "near": self.near}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(packs=[list(p) for p in data["packs"]],
                   reuse={d: (str(v[0]), str(v[1])) for d, v in data["reuse"].items()}, near=dict(data["near"]))

    def members(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for member, rep in self.near.items():
            out.setdefault(rep, []).append(member)
        return out


@dataclass
class JobView:
    """The job grouped by content: digest -> indices of the original items, in first-seen order."""

    job: SummarizeJob
    key: str
    scope: str
    model: str
    baseline: str
    groups: dict[str, list[int]]

    @classmethod
    def of(cls, job: SummarizeJob, model: str, baseline: str) -> JobView:
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(job.items):
            groups.setdefault(content_hash(item.text), []).append(i)
        return cls(job, job_key(job), reuse_scope(job.tenant, job.instruction, job.max_output_tokens, model),
                   model, baseline, groups)

    def text(self, digest: str) -> str:
        return self.job.items[self.groups[digest][0]].text

    def first_id(self, digest: str) -> str:
        return self.job.items[self.groups[digest][0]].id

    @property
    def total_items(self) -> int:
        return self.job.total_items or len(self.job.items)
