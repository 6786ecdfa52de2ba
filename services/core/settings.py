"""Settings from the environment (`FRUGAL_` prefix), frozen so nothing mutates them at run time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas import TaskType, Tier

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
    model_config = ConfigDict(frozen=True)

    allowed_models: tuple[str, ...] | None = None
    max_tier: Tier = "large"
    baseline_model: str | None = None


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

    # Gateway
    provider: ProviderName = "simulated"
    provider_timeout_s: float = 60.0
    provider_max_attempts: int = 3
    simulated_latency_scale: float = 1.0
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_prompts: bool = Field(default=False, description="Prompt text in logs is opt-in, for debugging only.")
    log_format: Literal["json", "console"] = "json"
    metrics_port: int | None = None

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, environment, then the TOML config file (`FRUGAL_CONFIG`,
        default `frugalstream.toml` in the working directory), which is what `frugalstream calibrate` writes."""
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_path())
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


def config_path() -> Path:
    return Path(os.environ.get("FRUGAL_CONFIG", "frugalstream.toml"))
