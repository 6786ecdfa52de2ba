"""Settings from the environment (`FRUGAL_` prefix), frozen so nothing mutates them at run time."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from frugalstream.schemas import TIERS, TaskType, Tier

ProviderName = Literal["simulated", "openai", "anthropic"]


class TierModels(BaseModel):
    """Each tier is an ordered list: the first model is used, the rest are fallbacks."""

    model_config = ConfigDict(frozen=True)

    small: tuple[str, ...] = Field(default=("gpt-4o-mini", "gpt-4.1-nano"), description="Cheapest tier.")
    mid: tuple[str, ...] = Field(default=("gpt-4.1-mini", "gpt-4o-mini"), description="Middle tier.")
    large: tuple[str, ...] = Field(default=("gpt-4o", "gpt-4.1"), description="Strongest tier.")

    def for_tier(self, tier: Tier) -> tuple[str, ...]:
        models: tuple[str, ...] = getattr(self, tier)
        return models

    def tier_of(self, model: str) -> Tier:
        """The lowest tier listing `model`; a model no tier lists counts as large (a pin to it is walled, budgeted
        and audited as the strongest, never as the cheapest)."""
        return next((tier for tier in TIERS if model in self.for_tier(tier)), "large")


class TenantPolicy(BaseModel):
    """What a tenant may do beyond its own walls. Everything that crosses one is granted here, never by a
    request alone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allowed_models: tuple[str, ...] | None = Field(
        default=None, description="Models the tenant may pin or be routed to; unset: any priced model.")
    max_tier: Tier = Field(default="large", description="Highest tier the tenant's requests are routed to.")
    baseline_model: str | None = Field(
        default=None, description="The tenant's counterfactual model; unset: `default_baseline_model`.")
    shared_scopes: tuple[str, ...] = Field(
        default=(), description="Shared cache scopes this tenant may name: it is answered from them and its "
                                "answers are stored in them. A scope no policy grants is refused.")
    reply_topic_prefixes: tuple[str, ...] | None = Field(
        default=None, description="Prefixes a request's reply_topic must start with; unset means `<tenant>.<name>`, "
                                  "one level deep (`acme.eu.x` may be tenant `acme.eu`'s). frugalstream's own "
                                  "topics and every DLQ are refused whatever this says.")
    allow_unpriced_models: bool = Field(
        default=False, description="Serve pins to models the price catalog lacks (billed with a price_unknown "
                                   "flag at a conservative rate) instead of refusing them.")
    cache_sampled: bool = Field(
        default=False, description="Serve answers sampled above temperature 0 from cache (and store them).")
    false_hit_target: float | None = Field(
        default=None, gt=0, lt=1, description="Bound on this tenant's semantic false hits; unset: "
                                              "`audit_false_hit_target`.")
    acceptance_target: float | None = Field(
        default=None, gt=0, lt=1, description="Share of this tenant's routed-down answers that must be accepted; "
                                              "unset: `audit_acceptance_target`.")
    quality_target: float | None = Field(
        default=None, gt=0, lt=1, description="Quality this tenant's routing must retain against always-baseline; "
                                              "unset: `audit_quality_target`.")

    def reply_prefixes(self, tenant: str) -> tuple[str, ...]:
        return self.reply_topic_prefixes if self.reply_topic_prefixes is not None else (f"{tenant}.",)


JudgeChoice = Literal["match", "embedding", "llm"]


def _default_judges() -> dict[str, JudgeChoice]:
    return {"classification": "match", "extraction": "match", "default": "embedding"}


def _default_context_budgets() -> dict[str, int]:
    return {"faq": 2_000, "classification": 2_000, "extraction": 4_000, "chat": 3_000, "summarization": 12_000,
            "drafting": 6_000, "creative": 4_000, "code": 12_000, "reasoning": 8_000}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FRUGAL_", env_nested_delimiter="__", frozen=True, extra="ignore",
    )

    # Kafka
    kafka_bootstrap: str = Field(
        default="localhost:9092", description="Kafka bootstrap servers, comma-separated host:port.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How clients talk to the brokers: TLS, SASL, both or neither.")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism, with a SASL_* security protocol.")
    kafka_sasl_username: str | None = Field(default=None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SASL password (never logged).")
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle that signs the brokers' certificates.")
    kafka_ssl_certfile: Path | None = Field(default=None, description="Client certificate, for mutual TLS.")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Client private key, for mutual TLS.")
    kafka_idempotent: bool = Field(default=True, description="Off only for brokers without idempotent producers.")
    kafka_fetch_max_wait_ms: int = Field(
        default=500, ge=0, description="Longest a fetch waits for data; lower it on brokers that never answer a "
                                 "waiting fetch early (the embedded Tansu broker), where it is the latency.")
    kafka_linger_ms: int = Field(
        default=0, ge=0, le=1_000, description="How long the services' producer holds a message to batch it with "
                                               "others. Every stage waits for its outputs' acks before it commits, "
                                               "so this is added to each hop; messages that queue while a send is "
                                               "in flight are batched anyway.")
    kafka_session_timeout_ms: int = Field(default=10_000, ge=6_000, description="Kafka rejects less than 6 s.")
    concurrent_batches: int = Field(
        default=16, ge=1, le=64, description="Batches the classifier runs at once, committed in offset order: a long "
                                            "history to embed holds no other request behind it.")
    gateway_calls_in_flight: int = Field(
        default=512, ge=1, le=10_000, description="Requests the gateway has in flight at once (model calls), in "
                                                 "batches committed in offset order; past it, it takes no new batch. "
                                                 "At least the request rate times a long answer's seconds, or "
                                                 "requests queue behind slow answers. Each holds its request in "
                                                 "memory (up to `max_message_bytes`).")
    kafka_client_id: str = Field(
        default="frugalstream", description="Client id prefix shown in broker logs and quotas.")
    topic_prefix: str = Field(default="", description="Prepended to every topic name (tests, multi-env clusters).")
    group_prefix: str = Field(default="frugalstream", description="Consumer groups are `<group_prefix>.<service>`.")
    max_message_bytes: int = Field(
        default=1_000_000, gt=0, description="Largest message read or published; a larger request is answered "
                                       "`too_large`. Keep it under the broker's message.max.bytes.")

    # Routing
    tiers: TierModels = Field(
        default=TierModels(), description="Ordered models per tier (small, mid, large): the first is used, the "
                                          "rest are fallbacks.")
    default_baseline_model: str = Field(
        default="gpt-4o", description="What the counterfactual is priced on when a tenant names no baseline.")
    tenants: dict[str, TenantPolicy] = Field(
        default_factory=dict, description="Per-tenant policy (see the tenant policy table).")
    context_budgets: dict[str, int] = Field(
        default_factory=_default_context_budgets, description="History token budget per task type; older "
                                                              "turns beyond it are trimmed.")
    budget_action: Literal["downgrade", "refuse"] = Field(
        default="downgrade", description="What an exhausted budget whose entry names no `action` does: route to "
                                         "the small tier, or refuse with `budget_exceeded` what would call a "
                                         "model (cached answers and in-flight twins, which cost nothing, are "
                                         "still served).")
    # Escalation score at or above which a request goes to mid / large (`frugalstream calibrate` sets them).
    route_threshold_mid: float = Field(
        default=0.12, ge=0, le=1, description="Escalation score at or above which a request goes to mid "
                                             "(`frugalstream calibrate` sets it).")
    route_threshold_large: float = Field(
        default=0.20, ge=0, le=1, description="Escalation score at or above which a request goes to large "
                                             "(`frugalstream calibrate` sets it).")

    # Dedupe. Semantic matching is on only where a reworded request wants the same answer.
    semantic_task_types: tuple[TaskType, ...] = Field(
        default=("faq",), description="Task types where a verified rewording is answered from cache; the "
                                      "others use exact matches only.")
    model_precision: Literal["int8", "fp32"] = Field(
        default="int8", description="int8: the shipped quantized ONNX models on ONNX Runtime (no torch). fp32: "
                                    "the original weights on torch, for comparison; needs the `train` extra.")
    embed_max_tokens: int = Field(
        default=256, ge=16, le=512, description="Tokens of a request's lookup text the embedder reads; longer "
                                                "texts are truncated (the router and verifier were tuned at 256).")
    model_threads: int = Field(
        default=1, ge=1, le=64, description="ONNX Runtime threads per model; one suits services that share a "
                                            "few cores, since batching across requests pays more.")
    semantic_verifier: Literal["cross_encoder", "features"] = Field(
        default="cross_encoder",
        description="cross_encoder: a fine-tuned MiniLM reads both texts (~20 ms for one candidate on 2 cores, "
                    "~10 ms each in a batch); features: a lexical MLP (microseconds, lower recall at equal "
                    "precision).")
    semantic_recall_cosine: dict[str, float] = Field(
        default_factory=dict, description="Per task type; unset types use the shipped verifier's default.")
    semantic_verify_threshold: dict[str, float] = Field(
        default_factory=dict, description="Per task type; unset types use the shipped verifier's default.")
    semantic_answer_clusters: bool = Field(
        default=True, description="A rewording the verifier rejects may still be answered when the cached questions "
                                  "that share an answer agree it belongs to theirs (answer clusters per scope).")
    answer_cluster_threshold: float | None = Field(
        default=None, ge=0, le=1, description="Confidence the answer-cluster model needs to serve; unset: the "
                                              "threshold shipped with the model (tuned for 1% false hits).")
    cache_ttl_s: dict[str, int] = Field(
        default_factory=lambda: {"faq": 7 * 86400, "default": 86400},
        description="Seconds a cached answer is served, per task type (`default` for the rest).")
    cache_max_entries: int = Field(default=200_000, ge=0, description="Cached answers kept per dedupe instance.")
    coalesce_timeout_s: float = Field(
        default=30.0, ge=0, description="How long a request waits for an in-flight twin's answer before it is "
                                  "dispatched itself.")
    shard_sweep_interval_s: float = Field(
        default=300.0, gt=0, description="How often expired entries are removed from the semantic index.")

    # Gateway
    provider: ProviderName = Field(
        default="simulated", description="Model provider: openai (any OpenAI-compatible endpoint), anthropic, "
                                         "or simulated (deterministic answers, named as such everywhere).")
    provider_timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one provider call.")
    provider_max_attempts: int = Field(
        default=3, ge=1, description="Attempts per model before falling back to the next.")
    simulated_latency_scale: float = Field(
        default=1.0, ge=0, description="Scale of the simulated provider's realistic latency (0 answers at once).")
    idempotency_retention_s: float = Field(
        default=7 * 86400, gt=0,
        description="How long a paid call is remembered (on `llm.gateway.completed`): a redelivery within it "
                    "replays the answer instead of paying again.")
    openai_base_url: str = Field(
        default="https://api.openai.com/v1", description="OpenAI-compatible endpoint (vLLM, Ollama, Azure, "
                                                         "OpenRouter...).")
    openai_api_key: SecretStr | None = Field(default=None, description="OpenAI-compatible API key (never logged).")
    openai_api_key_file: Path | None = Field(
        default=None, description="File holding the OpenAI key (a mounted secret); used when the key is unset or "
                                  "empty. May be missing only while no tier, baseline or judge model is at OpenAI.")
    anthropic_base_url: str = Field(default="https://api.anthropic.com", description="Anthropic Messages API endpoint.")
    anthropic_api_key: SecretStr | None = Field(default=None, description="Anthropic API key (never logged).")
    anthropic_api_key_file: Path | None = Field(
        default=None, description="File holding the Anthropic key (a mounted secret); used when the key is unset "
                                  "or empty. May be missing only while no tier, baseline or judge model is at "
                                  "Anthropic.")
    # Deferrable requests through provider batch APIs (gateway/batch_runner.py), and provider prompt caching.
    batch_deferrable: bool = Field(
        default=True, description="Requests that can wait (latency_class / deadline) go through the provider's "
                                  "batch API at its batch price; off: every request is called at once.")
    batch_gather_s: float = Field(
        default=60.0, gt=0, description="How long a batch job gathers deferrable requests before it is submitted.")
    batch_max_requests: int = Field(
        default=1000, ge=1, le=50_000, description="Requests per batch job (also bounded by max_message_bytes).")
    batch_poll_interval_s: float = Field(default=30.0, gt=0, description="How often a submitted batch is polled.")
    batch_min_lead_s: float = Field(
        default=900.0, ge=0, description="A deferrable request due sooner than this is called at once instead.")
    batch_fallback_margin_s: float = Field(
        default=120.0, gt=0, description="A batched request still unanswered this long before it is due is "
                                         "answered by an interactive call instead.")
    simulated_batch_delay_s: float = Field(
        default=5.0, ge=0, description="Seconds after which a simulated batch job completes.")
    prompt_cache_min_tokens: int = Field(
        default=1024, ge=1, description="Shortest prefix given an explicit cache breakpoint (Anthropic caches "
                                        "nothing shorter: 1024 tokens, 2048 for Haiku models).")
    prompt_cache_ttl_s: float = Field(
        default=300.0, gt=0, description="Lifetime of a provider's prompt cache entry: a breakpoint is placed on a "
                                         "prefix seen again within it (the write premium then pays back).")

    # Audits: a sample of every saving gets its counterfactual and a verdict; thresholds hold the targets.
    audit_rate: float = Field(
        default=0.05, ge=0, le=1, description="Share of each kind of saving (semantic hit, coalesced, routed "
                                              "down, trimmed) that also gets the baseline's answer on the full "
                                              "history and a verdict.")
    audit_rates: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: {"near_miss": 1.0, "routed_up": 0.02},
        description="Per decision kind, over `audit_rate`: `near_miss` labels cost no model call; `routed_up` "
                    "asks the cheapest tier too (could the request have gone cheaper?).")
    audit_sampling_secret: SecretStr | None = Field(
        default=None, description="Server-side secret mixed into the audit sampling hash (never logged): without "
                                  "it, which requests are audited follows from the tenant and request id alone, so "
                                  "a producer can choose ids that are never audited. Every service that samples "
                                  "(classifier, dedupe, gateway) must have the same one.")
    audit_sampling_secret_file: Path | None = Field(
        default=None, description="File holding the audit sampling secret (a mounted secret); used when the "
                                  "secret is unset or empty.")
    audit_judges: dict[str, JudgeChoice] = Field(
        default_factory=_default_judges,
        description="Judge per task type (`default` for the rest): match (normalized text or JSON), embedding "
                    "(answer similarity), llm (a model with a rubric, an accounted audit call).")
    audit_embedding_accept: float = Field(
        default=0.9, ge=0, le=1, description="Answer-embedding cosine at or above which the embedding judge "
                                             "accepts.")
    audit_judge_model: str = Field(default="gpt-4o-mini", description="Model of the LLM judge.")
    audit_judge_rubric: str | None = Field(
        default=None, description="The LLM judge's instructions; unset: the shipped rubric (ACCEPT or REJECT).")
    audit_false_hit_target: float = Field(
        default=0.01, gt=0, lt=1, description="Default bound on the semantic cache's false hits (upper bound); a "
                                              "tenant's `false_hit_target` overrides it.")
    audit_acceptance_target: float = Field(
        default=0.95, gt=0, lt=1, description="Default share of routed-down answers that must be accepted "
                                              "(lower bound); a tenant's `acceptance_target` overrides it.")
    audit_quality_target: float | None = Field(
        default=None, gt=0, lt=1, description="When set, the routing threshold holds quality retained against "
                                              "always-baseline (answers' grades, routed down and up) instead of "
                                              "routed-down acceptance; a tenant's `quality_target` overrides it.")
    audit_min_sample: int = Field(
        default=200, ge=1, description="Routing labels a quality-retained threshold waits for before it moves.")
    audit_calibrate: bool = Field(
        default=True, description="Move the semantic and routing thresholds per tenant and task type on audit "
                                  "verdicts (changes go on `llm.thresholds`).")
    audit_min_evidence: int = Field(
        default=30, ge=1, description="Labelled decisions (effective sample size) a threshold change rests on.")

    # State and observability
    state_dir: Path = Field(
        default=Path(".frugalstream"), description="The accountant's ledger, the summarizer's store and an "
                                                   "updated price catalog (keep it on a volume).")
    price_catalog: Path | None = Field(
        default=None, description="Price catalog file; unset: `<state_dir>/prices.json` once `frugalstream "
                                  "prices update` wrote it, else the shipped catalog.")
    price_overrides: Path | None = Field(
        default=None, description="Your own rates (same format as the catalog), merged per model on top.")
    budgets_file: Path | None = Field(default=None, description="Budgets, as TOML or JSON.")
    budget_tick_s: float = Field(
        default=60.0, gt=0, description="How often the accountant re-evaluates budgets without new usage, so "
                                        "periods roll over on time (a refused tenant is served again after midnight).")
    ledger_retention_days: int | None = Field(
        default=None, ge=32, description="Days the accountant keeps a cost event after storing it (pruned hourly); "
                                         "unset: for ever. At least 32, so a month's budget sees all its spend; keep "
                                         "it longer than `llm.usage` keeps records, or a replayed record counts again.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log threshold.")
    log_prompts: bool = Field(default=False, description="Prompt text in logs is opt-in, for debugging only.")
    log_format: Literal["json", "console"] = Field(
        default="json", description="json lines (for collectors) or console (for people).")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Port of `/metrics` (Prometheus), `/healthz` and `/readyz` "
                                                  "(probes); unset: no server.")
    metrics_tenant_labels: int = Field(
        default=100, ge=0, description="Tenants not in `tenants` labelled by name in the per-tenant metric series "
                                       "(the first seen by each process); later ones are labelled `other`, so a "
                                       "producer inventing tenants cannot grow the series without bound.")
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP base URL traces are exported to (like OTEL_EXPORTER_OTLP_ENDPOINT, "
                                  "which also works); unset: no tracing, no exporter.")

    # OpenAI-compatible HTTP entry (`frugalstream serve http`, `frugalstream dev --http-port`)
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP entry listens on.")
    http_port: int = Field(default=8080, ge=0, le=65535,
                           description="Port the HTTP entry listens on.")
    http_api_keys: SecretStr | None = Field(
        default=None, description='API keys as a JSON object {"<key>": "<tenant>", ...} (or {"<key>": {"tenant": '
                                  '"<tenant>", "tags": {...}}}: tags set on every request made with the key); a '
                                  "request without a listed key gets 401. `frugalstream dev` accepts `frugal-dev` "
                                  "(tenant `dev`) when no key is configured.")
    http_api_keys_file: Path | None = Field(default=None, description="The same JSON object, from a file.")
    http_max_pending: int = Field(
        default=1000, gt=0, description="Calls one HTTP entry may hold (reading bodies or waiting on answers); "
                                        "beyond it the pipeline is behind and callers get 429 with Retry-After.")
    http_tenant_pending_share: float = Field(
        default=0.5, gt=0, le=1, description="Share of http_max_pending one tenant may hold when the entry's keys "
                                             "name more than one tenant; beyond it that tenant alone gets 429, so "
                                             "one busy tenant cannot starve the others (1: no per-tenant cap).")
    http_timeout_s: float = Field(default=120.0, gt=0, description="How long a call waits for its answer (504).")

    # Fault injection, for the crash tests only: the named service exits hard (no flush, no commit) right after
    # publishing the outputs of its N-th batch, i.e. inside the publish-to-commit window.
    fault_exit_after_publish: str | None = Field(
        default=None, description="Tests only: the named service exits hard after publishing a batch.")
    fault_exit_after_batches: int = Field(
        default=1, ge=1, description="Tests only: which batch `fault_exit_after_publish` exits after.")
    # (audit_sampling_secret, audit_sampling_secret_file, the key they give), read on first use
    _audit_key: tuple[SecretStr | None, Path | None, bytes | None] | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, environment, then the TOML config file (`FRUGAL_CONFIG`,
        default `frugalstream.toml` in the working directory), which is what `frugalstream calibrate` writes."""
        path = config_path()
        try:
            toml = TomlConfigSettingsSource(settings_cls, toml_file=path)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigFileError(f"config file {path} is not valid TOML: {exc}") from exc
        return init_settings, env_settings, toml, file_secret_settings

    @field_validator("kafka_sasl_password", "openai_api_key", "openai_api_key_file", "anthropic_api_key",
                     "anthropic_api_key_file", "http_api_keys", "http_api_keys_file", "audit_sampling_secret",
                     "audit_sampling_secret_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """Compose's `FRUGAL_OPENAI_API_KEY: ${OPENAI_API_KEY:-}` passes "" when the operator keeps the key out of
        the environment: that is no key, so the documented `_FILE` setting is used instead of an empty key."""
        return None if isinstance(value, str) and not value.strip() else value

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, service: str) -> str:
        return f"{self.group_prefix}.{service}"

    def secret(self, value: SecretStr | None, file: Path | None) -> str | None:
        """Keys come from the environment or from a mounted file, never from code or logs."""
        if value is not None:
            return value.get_secret_value()
        if file is not None:
            try:
                return file.read_text().strip()
            except FileNotFoundError as exc:
                name = next((n for n in type(self).model_fields if getattr(self, n) is file), "key_file")
                raise MissingKeyFileError(f"setting FRUGAL_{name.upper()}={str(file)!r}: no such file (a secret "
                                          "that is not mounted, or a mistyped path)") from exc
        return None

    def audit_sampling_key(self) -> bytes | None:
        """The audit sampling secret as a hash key (None: unset, sampling is predictable), read once per settings
        object: it is asked for every sampled decision."""
        value, file = self.audit_sampling_secret, self.audit_sampling_secret_file
        cached = self._audit_key
        if cached is None or cached[0] is not value or cached[1] is not file:  # a copy with another secret
            secret = self.secret(value, file)
            cached = self._audit_key = (value, file, secret.encode() if secret else None)
        return cached[2]


class UsageError(ValueError):
    """A bad setting, argument or input file. The message names it, what was wrong and what is allowed; the
    `frugalstream` command prints it as one line on stderr and exits 2."""


class MissingKeyFileError(UsageError, FileNotFoundError):
    """A `*_FILE` setting names a file that does not exist: a bad setting (one line, exit 2), and still the
    FileNotFoundError it is."""


class ConfigFileError(UsageError):
    """The TOML config file exists but cannot be read; the message names the file and the position."""


def config_path() -> Path:
    return Path(os.environ.get("FRUGAL_CONFIG", "frugalstream.toml"))
