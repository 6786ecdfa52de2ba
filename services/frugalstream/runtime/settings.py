"""Settings from the environment (`FRUGAL_` prefix), frozen so nothing mutates them at run time."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from frugalstream.schemas import TaskType, Tier

ProviderName = Literal["simulated", "openai", "anthropic"]


class TierModels(BaseModel):
    """Each tier is an ordered list: the first model is used, the rest are fallbacks."""

    model_config = ConfigDict(frozen=True)

    small: tuple[str, ...] = ("gpt-4o-mini", "gpt-4.1-nano")
    mid: tuple[str, ...] = ("gpt-4.1-mini", "gpt-4o-mini")
    large: tuple[str, ...] = ("gpt-4o", "gpt-4.1")

    def for_tier(self, tier: Tier) -> tuple[str, ...]:
        models: tuple[str, ...] = getattr(self, tier)
        return models


class TenantPolicy(BaseModel):
    """What a tenant may do beyond its own walls. Everything that crosses one is granted here, never by a
    request alone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allowed_models: tuple[str, ...] | None = None
    max_tier: Tier = "large"
    baseline_model: str | None = None
    shared_scopes: tuple[str, ...] = Field(
        default=(), description="Shared cache scopes this tenant may name: it is answered from them and its "
                                "answers are stored in them. A scope no policy grants is refused.")
    reply_topic_prefixes: tuple[str, ...] | None = Field(
        default=None, description="Prefixes a request's reply_topic must start with; unset means `<tenant>.`. "
                                  "frugalstream's own topics and every DLQ are refused whatever this says.")
    allow_unpriced_models: bool = Field(
        default=False, description="Serve pins to models the price catalog lacks (billed with a price_unknown "
                                   "flag at a conservative rate) instead of refusing them.")
    cache_sampled: bool = Field(
        default=False, description="Serve answers sampled above temperature 0 from cache (and store them).")

    def reply_prefixes(self, tenant: str) -> tuple[str, ...]:
        return self.reply_topic_prefixes if self.reply_topic_prefixes is not None else (f"{tenant}.",)


def _default_context_budgets() -> dict[str, int]:
    return {"faq": 2_000, "classification": 2_000, "extraction": 4_000, "chat": 3_000, "summarization": 12_000,
            "drafting": 6_000, "creative": 4_000, "code": 12_000, "reasoning": 8_000}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FRUGAL_", env_nested_delimiter="__", frozen=True, extra="ignore",
    )

    # Kafka
    kafka_bootstrap: str = "localhost:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_idempotent: bool = Field(default=True, description="Off only for brokers without idempotent producers.")
    kafka_fetch_max_wait_ms: int = 500
    kafka_session_timeout_ms: int = Field(default=10_000, ge=6_000, description="Kafka rejects less than 6 s.")
    kafka_client_id: str = "frugalstream"
    topic_prefix: str = Field(default="", description="Prepended to every topic name (tests, multi-env clusters).")
    group_prefix: str = "frugalstream"
    max_message_bytes: int = 1_000_000

    # Routing
    tiers: TierModels = TierModels()
    default_baseline_model: str = "gpt-4o"
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    context_budgets: dict[str, int] = Field(default_factory=_default_context_budgets)
    budget_action: Literal["downgrade", "refuse"] = "downgrade"
    # Escalation score at or above which a request goes to mid / large (`frugalstream calibrate` sets them).
    route_threshold_mid: float = Field(default=0.12, ge=0, le=1)
    route_threshold_large: float = Field(default=0.20, ge=0, le=1)

    # Dedupe. Semantic matching is on only where a reworded request wants the same answer.
    semantic_task_types: tuple[TaskType, ...] = ("faq",)
    semantic_verifier: Literal["cross_encoder", "features"] = Field(
        default="cross_encoder",
        description="cross_encoder: a fine-tuned MiniLM reads both texts (~20 ms for one candidate on 2 cores, "
                    "~10 ms each in a batch); features: a lexical MLP (microseconds, lower recall at equal "
                    "precision).")
    semantic_recall_cosine: dict[str, float] = Field(
        default_factory=dict, description="Per task type; unset types use the shipped verifier's default.")
    semantic_verify_threshold: dict[str, float] = Field(
        default_factory=dict, description="Per task type; unset types use the shipped verifier's default.")
    cache_ttl_s: dict[str, int] = Field(default_factory=lambda: {"faq": 7 * 86400, "default": 86400})
    cache_max_entries: int = 200_000
    coalesce_timeout_s: float = 30.0
    shard_sweep_interval_s: float = Field(
        default=300.0, gt=0, description="How often expired entries are removed from the semantic index.")

    # Gateway
    provider: ProviderName = "simulated"
    provider_timeout_s: float = 60.0
    provider_max_attempts: int = 3
    simulated_latency_scale: float = 1.0
    idempotency_retention_s: float = Field(
        default=7 * 86400, gt=0,
        description="How long a paid call is remembered (on `llm.gateway.completed`): a redelivery within it "
                    "replays the answer instead of paying again.")
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr | None = None
    openai_api_key_file: Path | None = None
    anthropic_base_url: str = "https://api.anthropic.com"
    anthropic_api_key: SecretStr | None = None
    anthropic_api_key_file: Path | None = None

    # State and observability
    state_dir: Path = Path(".frugalstream")
    price_overrides: Path | None = None
    budgets_file: Path | None = None
    budget_tick_s: float = Field(
        default=60.0, gt=0, description="How often the accountant re-evaluates budgets without new usage, so "
                                        "periods roll over on time (a refused tenant is served again after midnight).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_prompts: bool = Field(default=False, description="Prompt text in logs is opt-in, for debugging only.")
    log_format: Literal["json", "console"] = "json"
    metrics_port: int | None = None

    # Fault injection, for the crash tests only: the named service exits hard (no flush, no commit) right after
    # publishing the outputs of its N-th batch, i.e. inside the publish-to-commit window.
    fault_exit_after_publish: str | None = None
    fault_exit_after_batches: int = Field(default=1, ge=1)

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

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, service: str) -> str:
        return f"{self.group_prefix}.{service}"

    def secret(self, value: SecretStr | None, file: Path | None) -> str | None:
        """Keys come from the environment or from a mounted file, never from code or logs."""
        if value is not None:
            return value.get_secret_value()
        if file is not None:
            return file.read_text().strip()
        return None


class UsageError(ValueError):
    """A bad setting, argument or input file. The message names it, what was wrong and what is allowed; the
    `frugalstream` command prints it as one line on stderr and exits 2."""


class ConfigFileError(UsageError):
    """The TOML config file exists but cannot be read; the message names the file and the position."""


def config_path() -> Path:
    return Path(os.environ.get("FRUGAL_CONFIG", "frugalstream.toml"))
