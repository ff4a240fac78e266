"""Configuration: one TOML file, overridden by ``RELAY_*`` environment variables, which
command-line options override in turn.

The effect-type registry lives in the same file so that the relay, the reconciler, the CLI and the
Helm chart all read one set of declarations. Everything is validated at start; a bad value is
reported with the name of the setting (and of the variable that overrides it).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from relay.business_keys import templates_apart
from relay.errors import ConfigError, EffectTypeError
from relay.redaction import register_dsn, register_secret

ENV_PREFIX = "RELAY_"
DEFAULT_CONFIG_FILE = "relay.toml"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._\-]{1,249}$")
_TEMPLATE_FIELD = re.compile(r"\{([A-Za-z0-9_]+)\}")


class ObserverSpec(BaseModel):
    """How the reconciler asks the downstream system whether an UNKNOWN effect happened."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    http_url: str | None = Field(
        default=None, description="URL template over {business_key} and {operation_key}."
    )
    python: str | None = Field(default=None, description="Import path 'package.module:function'.")
    timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> ObserverSpec:
        if (self.http_url is None) == (self.python is None):
            raise ValueError("an observer needs exactly one of 'http_url' or 'python'")
        if self.python is not None and ":" not in self.python:
            raise ValueError("'python' must look like 'package.module:function'")
        return self


class EffectTypeSpec(BaseModel):
    """One declared effect type. Declared once, read by every process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    topic: str
    idempotent: bool = False
    business_key: str | None = Field(
        default=None,
        description="Template over top-level payload fields, e.g. '{account}:{amount}:{date}'.",
    )
    result_topic: str | None = None
    outcome_timeout_s: float = Field(default=300.0, gt=0)
    observer: ObserverSpec | None = None
    compensation: str | None = Field(
        default=None, description="Name of the effect type that undoes this one."
    )
    max_attempts: int = Field(default=5, ge=1, le=1000)
    key_by_group: bool = Field(
        default=False,
        description="Key each record by its ordering group instead of its operation key "
        "(the partition follows the group either way).",
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "must start with a letter and hold only letters, digits, '_', '.', '-', at most 63 "
                "characters (a label of the intake's enum of types: PostgreSQL's limit)"
            )
        if value.startswith("relay."):
            raise ValueError("names starting with 'relay.' are reserved for the relay's own")
        return value

    @field_validator("topic", "result_topic")
    @classmethod
    def _valid_topic(cls, value: str | None) -> str | None:
        if value is not None and (not _TOPIC.match(value) or value in {".", ".."}):
            raise ValueError(f"{value!r} is not a legal Kafka topic name")
        return value

    @field_validator("business_key")
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        if value is not None and not _TEMPLATE_FIELD.search(value):
            raise ValueError("must name at least one payload field, like '{account}'")
        if value is not None and re.search(r"\}\{", value):
            # Each field's value is escaped against the template's text; two fields with no
            # text between them could still split one key two ways.
            raise ValueError("payload fields must be separated by text, like '{a}:{b}'")
        return value

    @model_validator(mode="after")
    def _resolvable(self) -> EffectTypeSpec:
        if not self.idempotent and not (self.business_key or self.observer or self.compensation):
            raise EffectTypeError(
                f"effect type {self.name!r} is not idempotent but declares no business_key, "
                "observer or compensation: an UNKNOWN outcome could never be resolved safely"
            )
        return self

    @property
    def awaits_result(self) -> bool:
        return self.result_topic is not None


class Settings(BaseSettings):
    """Every setting of the relay. Environment variables ``RELAY_<NAME>`` override the file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        env_ignore_empty=True,
        # A rejected value may be a database URL with its password: never echo it in an error.
        hide_input_in_errors=True,
    )

    database_url: str | None = Field(default=None, description="PostgreSQL conninfo or URL.")
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = Field(
        default=None, description="Client certificate (PEM) for Kafka mTLS."
    )
    kafka_ssl_keyfile: str | None = Field(
        default=None, description="Private key (PEM) of the client certificate."
    )
    kafka_ssl_password: SecretStr | None = Field(
        default=None, description="Password of kafka_ssl_keyfile, if it is encrypted."
    )
    max_claim_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description="A claim stops once its payloads (as stored) reach this many bytes; it "
        "always takes at least one effect. Bounds the relay's memory per batch.",
    )
    max_payload_bytes: int = Field(
        default=1_000_000,
        ge=2,
        description="Largest payload (its JSON text, in bytes) `relay enqueue` accepts.",
    )
    max_pending_per_group: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Intents one ordering group may hold not yet published; an enqueue into a "
        "group that holds this many is refused (GroupFullError, SQLSTATE RL008).",
    )

    replica_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=200,
        description="Identity of a relay replica; a second process with the id of a live one "
        "refuses to start unless `relay run --take-over`.",
    )
    batch_size: int = Field(
        default=5_000,
        ge=1,
        le=50_000,
        description="Effects per claim, each claim one Kafka transaction; also how many intake "
        "rows one read takes (500 at most once it meets an ordering group). Live load makes "
        "smaller batches by itself; a backlog fills them (docs/benchmarks.md: 5,000 drained "
        "1.18-1.26x as fast as 500 in paired runs).",
    )
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    lease_s: float = Field(
        default=90.0,
        gt=0,
        description="How long a claimed effect stays with its replica; past it, an effect left "
        "DISPATCHING is UNKNOWN. Must exceed 2 x publish_timeout_s (sends, then commit).",
    )
    publish_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Bound on each Kafka wait of a batch (the sends, the commit or abort); an "
        "expired wait ends the batch UNKNOWN.",
    )
    max_request_size: int = Field(default=1_048_576, ge=1024)
    max_message_bytes: int = Field(
        default=1_048_588,
        ge=1024,
        description="Largest record the brokers accept (message.max.bytes); larger records are "
        "REJECTED before any send: a broker-side refusal aborts the producer's other batches.",
    )
    linger_ms: int = Field(default=5, ge=0, le=10_000)
    kafka_compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = Field(
        default=None,
        description="Producer compression (lz4 and zstd need the 'compression' extra: "
        "pip install outbox-relay[compression]).",
    )
    kafka_transactions: bool = Field(
        default=True,
        description="Publish each batch in a Kafka transaction (transactional id per replica), so "
        "an ambiguous batch can be verified after fencing. False: idempotent producer only.",
    )
    transaction_timeout_s: float = Field(
        default=90.0,
        gt=0,
        description="Kafka transaction.timeout.ms of the relay's producer; must exceed "
        "2 x publish_timeout_s and stay within the brokers' transaction.max.timeout.ms.",
    )
    verify_max_tries: int = Field(
        default=20, ge=1, description="Failed checks of an ambiguous publish before it is STUCK."
    )
    verify_backoff_max_s: float = Field(default=300.0, gt=0)
    clock_skew_s: float = Field(
        default=30.0, ge=0, description="Allowed clock difference between relay and database."
    )
    max_publish_attempts: int = Field(
        default=10,
        ge=1,
        description="Attempts that provably did not publish (not sent, aborted) before REJECTED.",
    )
    not_sent_backoff_s: float = Field(default=1.0, gt=0)
    not_sent_backoff_max_s: float = Field(default=60.0, gt=0)
    outage_backoff_max_s: float = Field(default=30.0, gt=0)
    cloudevents_source: str = "/outbox-relay"
    status_topic: str = "relay.status"
    receipts_topic: str | None = Field(
        default="relay.receipts",
        description="Topic of the receipt the relay writes into each Kafka transaction (with "
        "kafka_transactions): a batch left without an outcome (a crash, a lost answer) is then "
        "settled with one read of it, not made UNKNOWN and looked for effect by effect. Only "
        "the relay may write it (docs/deployment.md). Empty: no receipts.",
    )
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    effect_types: dict[str, EffectTypeSpec] = Field(default_factory=dict)
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address /metrics, /healthz and /readyz listen on (metrics_port 0: off); "
        "loopback unless set, e.g. 0.0.0.0 in a container that Prometheus scrapes.",
    )
    reconcile_metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of `relay reconcile`'s /metrics, /healthz and /readyz, so that both "
        "daemons can run on one host; unset: metrics_port + 1 (9401), off when metrics_port is 0. "
        "0: off.",
    )
    metrics_cache_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="The outbox gauges (effects by state, oldest ages) are read from the "
        "database at most once per this many seconds, however many scrapers ask.",
    )
    reconcile_group_id: str = Field(
        default="relay-reconciler",
        min_length=1,
        description="Kafka consumer group of the reconciler replicas on the result topics.",
    )
    reconcile_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="Result records applied per database commit."
    )
    reconcile_stall_rounds: int = Field(
        default=5,
        ge=1,
        description="Consecutive failed rounds of the result consumer or of the timers after "
        "which the reconciler reports itself not ready (/readyz 503) until a round succeeds",
    )
    reconcile_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often the reconciler sweeps deadlines, deferred results and observations.",
    )
    observe_backoff_s: float = Field(
        default=5.0, gt=0, description="First wait before asking an observer again (doubles)."
    )
    observe_backoff_max_s: float = Field(default=300.0, gt=0)
    observe_max_tries: int = Field(
        default=5, ge=1, description="Inconclusive observations before an UNKNOWN effect is STUCK."
    )
    redispatch_backoff_s: float = Field(
        default=1.0,
        ge=0,
        description="Wait before re-dispatching an effect observed absent; doubles per attempt.",
    )
    redispatch_backoff_max_s: float = Field(default=300.0, ge=0)
    status_events: bool = Field(
        default=True,
        description="Emit a status event (on status_topic, published by the relay from the "
        "transitions log) for every transition; switched as set by `relay migrate`, `relay run` "
        "and `relay reconcile`.",
    )
    retention_s: float = Field(
        default=30 * 86400.0,
        gt=0,
        description="Finished effects (and their attempts, evidence, transitions) older than "
        "this are removed by `relay purge`.",
    )
    dedupe_window_s: float = Field(
        default=30 * 86400.0,
        gt=0,
        description="How long the key of a purged effect stays taken after the purge: enqueueing "
        "it again is refused (deduplication lasts retention_s + dedupe_window_s).",
    )
    purge_batch_size: int = Field(
        default=500,
        ge=1,
        le=50_000,
        description="Effects (each with its compensations) deleted per short purge transaction.",
    )

    console_host: str = Field(
        default="127.0.0.1",
        description="Address `relay console` listens on; loopback unless set.",
    )
    console_port: int = Field(default=8400, ge=1, le=65535, description="Port of the console.")
    console_auth: Literal["login", "proxy"] = Field(
        default="login",
        description="login: the console's own sign-in against console_users_file; proxy: an "
        "authenticating proxy names the user in console_proxy_header.",
    )
    console_users_file: str | None = Field(
        default=None,
        description="File of 'name:right:hash' lines (right viewer or operator; hash from "
        "`relay console --hash-password NAME`), e.g. a mounted Secret. Login mode only.",
    )
    console_proxy_header: str = Field(
        default="X-Forwarded-User",
        min_length=1,
        description="Header naming the signed-in user (proxy mode), trusted only from "
        "console_proxy_addresses.",
    )
    console_proxy_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of the authenticating proxies, comma-separated "
        "in the variable; required in proxy mode. From anyone else the header is ignored.",
    )
    console_operators: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Proxy mode: the users (as the header names them) with the operator right; "
        "everyone else the proxy lets in is a viewer.",
    )
    console_read_only: bool = Field(
        default=False, description="Offer and accept no decision, whoever asks."
    )
    console_cookie_secure: bool = Field(
        default=False,
        description="Mark the session cookie Secure (the browser reaches the console over "
        "https through a TLS-terminating proxy); it is Secure anyway on a request made over https.",
    )
    console_session_s: float = Field(
        default=8 * 3600.0, gt=0, description="How long a sign-in (and its CSRF token) lasts."
    )
    console_secret: SecretStr | None = Field(
        default=None,
        description="Key that signs session cookies and CSRF tokens, so that replicas and "
        "restarts accept each other's; unset: a random key per process.",
    )
    console_page_size: int = Field(
        default=50, ge=1, le=1000, description="Rows per page of the console's lists."
    )
    console_viewer_database_url: str | None = Field(
        default=None,
        description="PostgreSQL login the console reads with for viewers (a <prefix>viewer "
        "login of `relay roles`: SELECT only); unset: viewers share database_url's rights "
        "(a warning at start).",
    )
    console_bulk_cap: int = Field(
        default=100,
        ge=1,
        le=1000,
        description="Most effects one bulk decision (over a list's filter) applies to.",
    )
    console_refresh_s: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="The overview and the lists reload themselves every this many seconds "
        "(a meta refresh, no script); 0: never.",
    )

    @field_validator("console_proxy_addresses", "console_operators", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("console_proxy_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url", "console_viewer_database_url")
    @classmethod
    def _parsable_database_url(cls, value: str | None) -> str | None:
        register_dsn(value)  # raises ValueError, without the value, when it does not parse
        return value

    @model_validator(mode="after")
    def _register_secrets(self) -> Settings:
        """Every password this process holds is masked in everything it prints."""
        for secret in (self.kafka_sasl_password, self.kafka_ssl_password, self.console_secret):
            if secret is not None:
                register_secret(secret.get_secret_value())
        return self

    @model_validator(mode="before")
    @classmethod
    def _name_effect_types(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("effect_types"), dict):
            named: dict[str, Any] = {}
            for key, spec in data["effect_types"].items():
                named[key] = {"name": key, **spec} if isinstance(spec, dict) else spec
            data = {**data, "effect_types": named}
        return data

    @model_validator(mode="after")
    def _timeouts_fit(self) -> Settings:
        if self.lease_s <= 2 * self.publish_timeout_s:
            raise ValueError(
                f"lease_s ({self.lease_s:g}) must exceed 2 x publish_timeout_s "
                f"({self.publish_timeout_s:g}): a live replica's batch must end within its lease"
            )
        if self.transaction_timeout_s <= 2 * self.publish_timeout_s:
            raise ValueError(
                f"transaction_timeout_s ({self.transaction_timeout_s:g}) must exceed "
                f"2 x publish_timeout_s ({self.publish_timeout_s:g})"
            )
        if self.publish_timeout_s * 1000 <= self.linger_ms + 1000:
            # The producer's delivery timeout (publish_timeout_s) must exceed its linger plus a
            # request timeout of at least a second: kafka-python refuses the producer otherwise,
            # and a daemon would retry that refusal for ever as if Kafka were down.
            raise ValueError(
                f"publish_timeout_s ({self.publish_timeout_s:g}) must exceed linger_ms "
                f"({self.linger_ms}) + 1 s"
            )
        return self

    @model_validator(mode="after")
    def _metrics_ports_fit(self) -> Settings:
        if self.reconcile_metrics_port is None and self.metrics_port == 65535:
            raise ValueError(
                "metrics_port 65535 leaves no default port for the reconciler (metrics_port + 1): "
                "set reconcile_metrics_port"
            )
        return self

    @model_validator(mode="after")
    def _compensations_declared(self) -> Settings:
        for spec in self.effect_types.values():
            if spec.compensation is not None and spec.compensation not in self.effect_types:
                raise EffectTypeError(
                    f"effect type {spec.name!r} names compensation {spec.compensation!r}, "
                    "which is not a declared effect type"
                )
        return self

    @model_validator(mode="after")
    def _business_keys_apart(self) -> Settings:
        """Two templates that can make one key would let an application's effect take the key of
        another type's effect: an observer searching the downstream by it could find either."""
        templated = [s for s in self.effect_types.values() if s.business_key is not None]
        for i, spec in enumerate(templated):
            for other in templated[i + 1 :]:
                assert spec.business_key is not None and other.business_key is not None
                if not templates_apart(spec.business_key, other.business_key):
                    raise EffectTypeError(
                        f"effect types {spec.name!r} and {other.name!r} have business-key "
                        f"templates that can make the same key ({spec.business_key!r} and "
                        f"{other.business_key!r}): give each a text of its own, for example "
                        f"'{other.name}:' before its first field"
                    )
        return self

    @field_validator("receipts_topic")
    @classmethod
    def _receipts_topic(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None  # empty (RELAY_RECEIPTS_TOPIC=""): no receipts
        if not _TOPIC.match(value) or value in {".", ".."}:
            raise ValueError(f"{value!r} is not a legal Kafka topic name")
        return value

    @model_validator(mode="after")
    def _topics_apart(self) -> Settings:
        """A dispatch topic that is also a result or the status topic would let an application
        write results (or status events) through the outbox itself, confirming another's effect."""
        results = {s.result_topic: s.name for s in self.effect_types.values() if s.result_topic}
        for spec in self.effect_types.values():
            if spec.topic in results:
                raise EffectTypeError(
                    f"effect type {spec.name!r} publishes to {spec.topic!r}, the result topic of "
                    f"effect type {results[spec.topic]!r}: dispatch and result topics must differ"
                )
            if spec.topic == self.status_topic:
                raise EffectTypeError(
                    f"effect type {spec.name!r} publishes to {spec.topic!r}, the status topic "
                    "(status_topic): dispatch topics must differ from it"
                )
        if self.status_topic in results:
            raise EffectTypeError(
                f"status_topic {self.status_topic!r} is the result topic of effect type "
                f"{results[self.status_topic]!r}: they must differ"
            )
        receipts = self.receipts_topic
        if receipts is not None:
            # A receipt that an application could make the relay write (or write as a result)
            # would settle a batch that never committed as PUBLISHED.
            taken = {
                spec.topic: f"the topic of effect type {spec.name!r}"
                for spec in self.effect_types.values()
            }
            taken.update((t, f"the result topic of effect type {n!r}") for t, n in results.items())
            taken[self.status_topic] = "status_topic"
            if receipts in taken:
                raise EffectTypeError(
                    f"receipts_topic {receipts!r} is {taken[receipts]}: it must be a topic of "
                    "its own"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments (command-line options) win over the environment, which wins over
        # the file; load_settings hands the file's values over through _FILE_VALUES.
        return init_settings, env_settings, _FileSource(settings_cls)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "no database configured: set database_url in the config file or RELAY_DATABASE_URL"
            )
        return self.database_url

    def effect_type(self, name: str) -> EffectTypeSpec | None:
        return self.effect_types.get(name)

    def metrics_port_of(self, daemon: str) -> int:
        """The port ``daemon`` (relay | reconciler) serves its endpoints on; 0: none. Apart by
        default: two daemons on one host must not fight over one port."""
        if daemon != "reconciler":
            return self.metrics_port
        if self.reconcile_metrics_port is not None:
            return self.reconcile_metrics_port
        return self.metrics_port + 1 if self.metrics_port else 0


def config_path_from_env(explicit: Path | None) -> Path | None:
    """The file to read: explicit, else ``$RELAY_CONFIG``, else ``./relay.toml`` if present."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get("RELAY_CONFIG")
    if from_env:
        return Path(from_env)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


_FILE_VALUES: ContextVar[dict[str, Any]] = ContextVar("relay_file_values", default={})  # noqa: B039


class _FileSource(PydanticBaseSettingsSource):
    """The config file's values: below the environment and explicit arguments."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _FILE_VALUES.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get())


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read and validate the configuration, raising :class:`ConfigError` with a precise message."""
    data: dict[str, Any] = {}
    source = config_path_from_env(path)
    if source is not None:
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    token = _FILE_VALUES.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, overrides)) from None
    except EffectTypeError as exc:
        raise EffectTypeError(f"{source or 'configuration'}: {exc}") from None
    finally:
        _FILE_VALUES.reset(token)


def _from_environment(name: str, overrides: dict[str, Any]) -> str | None:
    """The ``RELAY_*`` variable that set ``name``, if one did (and no explicit argument won)."""
    if not name or name in overrides:
        return None
    wanted = f"{ENV_PREFIX}{name}".upper()
    for variable, value in os.environ.items():
        if variable.upper() == wanted and value != "":
            return variable
    return None


def _describe(exc: ValidationError, source: Path | None, overrides: dict[str, Any]) -> str:
    """Each problem with where its value came from: a variable, the file, or an argument."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        top = str(err["loc"][0]) if err["loc"] else ""
        message = str(err["msg"]).removeprefix("Value error, ")
        variable = _from_environment(top, overrides)
        if not err["loc"]:
            problems.append(message)
        elif variable is not None:
            problems.append(f"setting '{loc}' from environment variable {variable}: {message}")
        elif source is not None and top in _FILE_VALUES.get():
            problems.append(f"setting '{loc}' in {source}: {message}")
        else:
            env_name = f"{ENV_PREFIX}{top.upper()}"
            where = f" (or {env_name})" if top and top != "effect_types" else ""
            problems.append(f"setting '{loc}'{where}: {message}")
    return "invalid configuration: " + "; ".join(problems)
