"""Typed settings: one TOML file, every key overridable by ``VAENODE_<SECTION>__<KEY>``.

This module is the only home of defaults. Settings are validated once, at start-up, and an
unknown key or a bad value stops the node with a message naming the key: a PACS admin would
rather see the node refuse to start than quietly run with a setting it did not mean.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from node.errors import ConfigError

ENV_PREFIX = "VAENODE_"
DEFAULT_CONFIG = Path("config/node.toml")

_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 5.6.2 token
_HEADERS_SET_BY_THE_NODE = frozenset({"content-type", "content-length", "host",
                                      "transfer-encoding", "connection"})
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2 AE: 16 chars, no backslash


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 characters, no backslash)")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False


#: Listener processes on the DICOM port (node/ingest/listeners.py): two use both cores of a
#: small server when several scanners send at once (bench/RESULTS-ingest.md).
DEFAULT_LISTENER_PROCESSES = 2


class DicomSettings(_Section):
    ae_title: str = "VAENODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    require_called_aet: bool = True
    max_associations: int = Field(16, ge=1)
    listener_processes: int = Field(DEFAULT_LISTENER_PROCESSES, ge=1, le=64)
    max_pdu_bytes: int = Field(262144, ge=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(120.0, gt=0)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    _check_ae_title = field_validator("ae_title")(_check_ae)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_allowed(cls, entries: list[str]) -> list[str]:
        out = []
        for entry in entries:
            aet, _, host = entry.partition("@")
            _check_ae(aet)
            out.append(f"{aet.strip()}@{host}" if host else aet.strip())
        return out

    @model_validator(mode="before")
    @classmethod
    def _default_processes(cls, data: Any) -> Any:
        # A site that allows a single association gets a single listener process unless it
        # asks for more (and then the check below names both keys).
        if isinstance(data, dict) and "listener_processes" not in data:
            limit = data.get("max_associations")
            if isinstance(limit, int) and 0 < limit < DEFAULT_LISTENER_PROCESSES:
                return {**data, "listener_processes": limit}
        return data

    @model_validator(mode="after")
    def _check_processes(self) -> DicomSettings:
        # Each listener process gets its share of max_associations (see node/ingest/listeners.py).
        if self.max_associations < self.listener_processes:
            raise ValueError(f"max_associations ({self.max_associations}) must be at least "
                             f"listener_processes ({self.listener_processes})")
        return self


class StorageSettings(_Section):
    dir: Path = Path("var/storage")
    min_free_mb: int = Field(1024, ge=0)
    retention_days: float = Field(14.0, ge=0)  # images of finished series; 0 keeps them all
    retention_check_s: float = Field(3600.0, gt=0)


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/vaenode.db"
    busy_timeout_ms: int = Field(30000, ge=0)


class QueueSettings(_Section):
    series_idle_s: float = Field(30.0, gt=0)
    check_interval_s: float = Field(2.0, gt=0)
    complete_on_release: bool = True
    release_settle_s: float = Field(2.0, ge=0)
    release_min_instances: int = Field(2, ge=1)


class WorkerSettings(_Section):
    enabled: bool = True
    poll_interval_s: float = Field(2.0, gt=0)
    lease_s: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)


#: The model bundle shipped as the default since 2026-12-05 (issue 18: specific on real
#: scanners' series; the earlier default ``brain-t1`` 0.1.0 stays beside it, opt-in). Here,
#: torch-free, so that the model layer and the dashboard read one name.
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "models" / "brain-t1-multiscanner"


class ModelSettings(_Section):
    bundle: Path | None = None  # None: DEFAULT_BUNDLE
    estimator: Literal["importance", "plain", "mcmc"] | None = None  # None: the bundle's default
    samples: int | None = Field(None, ge=1)
    threshold: float | None = None  # overrides the bundle's calibrated threshold
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"


class LearningSettings(_Section):
    enabled: bool = True  # false: every verdict is the bundle's own; no station learns
    series: int = Field(20, ge=3)  # scored series of a station and protocol before it calibrates


#: Series descriptions the default brain T1 rule leaves alone although their echo time is short:
#: angiography (time of flight) and susceptibility-weighted images are not T1 anatomy.
BRAIN_T1_EXCLUDED_DESCRIPTIONS = r"(?<![a-z])(tof|angio|mra|swi|swan)"
#: Image Type values that say the same whatever the description: processed susceptibility-
#: weighted images (Siemens and others write ``ORIGINAL\PRIMARY\M\SWI\...``).
BRAIN_T1_EXCLUDED_IMAGE_TYPES = ["SWI"]


class RoutingRule(_Section):
    name: str
    modality: str | None = None
    station_name: list[str] = Field(default_factory=list)  # any of; a series without declines
    body_part: list[str] = Field(default_factory=list)  # any of (one string: that one)
    series_description: str | None = None  # regular expression, case-insensitive search
    exclude_series_description: str | None = None  # a match declines the series
    image_type: list[str] = Field(default_factory=list)  # all must be present
    exclude_image_type: list[str] = Field(default_factory=list)  # any present declines
    exclude_angio: bool = False  # Angio Flag Y (or enhanced Image Type ANGIO) declines
    echo_time_ms: tuple[float, float] | None = None  # [lowest, highest], inclusive
    repetition_time_ms: tuple[float, float] | None = None
    acquisition_contrast: list[str] = Field(default_factory=list)  # any of (enhanced MR)
    when_unstated: Literal["match", "skip"] = "match"
    model: Path | None = None  # None: [model].bundle
    min_abnormal_slices: int = Field(1, ge=1)
    score_derived: bool = False

    @field_validator("body_part", "acquisition_contrast", "exclude_image_type", "station_name",
                     mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("body_part", "acquisition_contrast", "exclude_image_type", "station_name")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values if v.strip()]

    @field_validator("echo_time_ms", "repetition_time_ms")
    @classmethod
    def _range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError(f"{list(value)} is not [lowest, highest] with 0 <= lowest <= highest")
        return value


def default_rules() -> list[RoutingRule]:
    """The rule of the shipped brain T1 model: brain (or unstated) MR with a T1-like echo time."""
    return [
        RoutingRule(
            name="brain-t1-mr",
            modality="MR",
            body_part=["HEAD", "BRAIN", "SKULL"],
            echo_time_ms=(0.0, 20.0),
            exclude_series_description=BRAIN_T1_EXCLUDED_DESCRIPTIONS,
            exclude_image_type=BRAIN_T1_EXCLUDED_IMAGE_TYPES,
            exclude_angio=True,
            min_abnormal_slices=3,
        )
    ]


class RoutingSettings(_Section):
    rules: list[RoutingRule] = Field(default_factory=default_rules)


class Destination(_Section):
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    _check_ae_title = field_validator("ae_title")(_check_ae)


class DeliverySettings(_Section):
    destinations: list[Destination] = Field(default_factory=list)
    max_attempts: int = Field(10, ge=1)
    retry_base_s: float = Field(5.0, gt=0)
    retry_max_s: float = Field(600.0, gt=0)
    poll_interval_s: float = Field(2.0, gt=0)


#: One address of a ``mailto:`` alert URL: local part and domain, no display name.
_MAIL_ADDRESS_RE = re.compile(r"^[^@\s,;<>\"]+@[^@\s,;<>\"]+\.[^@\s,;<>\"]+$")
_SMTP_DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}


def mailto_addresses(url: str) -> list[str]:
    """The recipients of a ``mailto:a@x.org,b@y.org`` alert URL (RFC 6068, without headers).

    Raises:
        ValueError: not a mailto URL, no address, a malformed one, or ``?`` headers.
    """
    if not url.lower().startswith("mailto:"):
        raise ValueError(f"{url!r} is not a mailto: URL")
    rest = urllib.parse.unquote(url[len("mailto:"):])
    if "?" in rest:
        raise ValueError(f"{url!r}: mailto headers (?subject=...) are not supported; the node "
                         "writes the subject")
    addresses = [a.strip() for a in rest.split(",") if a.strip()]
    if not addresses:
        raise ValueError(f"{url!r} names no address")
    for address in addresses:
        if not _MAIL_ADDRESS_RE.match(address):
            raise ValueError(f"{address!r} in {url!r} is not a mail address")
    return addresses


class SmtpSettings(_Section):
    # The mail relay that takes the node's mailto: alerts (the hospital's internal relay).
    host: str
    # Default by security: 587 (starttls), 465 (tls), 25 (none).
    port: int | None = Field(None, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    from_address: str
    username: str | None = None
    password: str | None = None
    # PEM CA bundle to verify the relay's certificate (a hospital's own CA); default: the
    # system's.
    ca_file: Path | None = None

    @field_validator("from_address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not _MAIL_ADDRESS_RE.match(v.strip()):
            raise ValueError(f"{v!r} is not a mail address")
        return v.strip()

    @model_validator(mode="after")
    def _credentials(self) -> SmtpSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("alerts.smtp.username and alerts.smtp.password go together")
        if self.username is not None and self.security == "none":
            raise ValueError("alerts.smtp.username needs security 'starttls' or 'tls': a "
                             "password is never sent in clear text")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or _SMTP_DEFAULT_PORTS[self.security]


class AlertSettings(_Section):
    # Where to send a message when a series is flagged: http(s) URLs get a JSON POST (a
    # messaging bridge, a display at the scanner), mailto: URLs an email through [alerts.smtp];
    # none by default.
    urls: list[str] = Field(default_factory=list)
    # The dashboard's address as people reach it, for a link in the message (optional).
    dashboard_url: str | None = None
    timeout_s: float = Field(5.0, gt=0)
    max_attempts: int = Field(5, ge=1)
    retry_base_s: float = Field(10.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    poll_interval_s: float = Field(5.0, gt=0)
    # Extra HTTP headers per URL (an Authorization token an endpoint wants), sent to that URL
    # only: {url = {Header-Name = "value"}}.
    headers: dict[str, dict[str, str]] = Field(default_factory=dict)

    smtp: SmtpSettings | None = None
    # Problems of the node itself go to these URLs (the PACS admin's channel; http(s) or
    # mailto:, as urls): reports a PACS has not taken, storage running out, series waiting
    # too long for a worker. None by default.
    ops_urls: list[str] = Field(default_factory=list)
    # How often the node looks for problems, in seconds.
    ops_check_s: float = Field(60.0, gt=0)
    # At most one message per problem (and destination or folder) per this many hours while
    # it lasts.
    ops_repeat_h: float = Field(4.0, gt=0)
    # A report not delivered this many minutes after it was made (or given up) is a problem.
    ops_delivery_wait_min: float = Field(15.0, gt=0)
    # A queued series that has waited this many minutes for a worker is a problem.
    ops_queue_wait_min: float = Field(15.0, gt=0)
    # Less free space than this on the storage's file system is a problem (C-STORE is refused
    # below [storage].min_free_mb).
    ops_storage_free_mb: int = Field(10240, ge=0)

    @field_validator("urls", "ops_urls")
    @classmethod
    def _alert_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if url.lower().startswith("mailto:"):
                mailto_addresses(url)
            elif not url.lower().startswith(("http://", "https://")):
                raise ValueError(f"{url!r}: an alert URL starts with http://, https:// or "
                                 "mailto:")
        return v

    @model_validator(mode="after")
    def _headers_of_known_urls(self) -> AlertSettings:
        every = [*self.urls, *self.ops_urls]
        if self.smtp is None and any(u.lower().startswith("mailto:") for u in every):
            raise ValueError("mailto: alert URLs need [alerts.smtp] (host, from_address)")
        for url, headers in self.headers.items():
            if url not in every:
                raise ValueError(f"headers for {url!r}, which is not one of alerts.urls or "
                                 "alerts.ops_urls")
            if url.lower().startswith("mailto:"):
                raise ValueError(f"headers for {url!r}: HTTP headers go with http(s) URLs only")
            for name, value in headers.items():
                if not _HEADER_NAME_RE.match(name):
                    raise ValueError(f"{name!r} is not an HTTP header name")
                if name.lower() in _HEADERS_SET_BY_THE_NODE:
                    raise ValueError(f"{name} is set by the node and cannot be configured")
                if any(c in value for c in "\r\n\0"):
                    raise ValueError(f"the value of header {name} holds a line break or NUL")
        return self

    def headers_for(self, url: str) -> dict[str, str]:
        """The configured extra headers of one URL (none for a URL not configured)."""
        return dict(self.headers.get(url, {}))


_HOST_NAME_RE = re.compile(r"^(\*|(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
                           r"(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*)$")
#: Names by which a browser on the node itself reaches a loopback dashboard.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class AdminSettings(_Section):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str | None = None
    show_patient_name: bool = False
    tls_cert_file: Path | None = None  # HTTPS for the dashboard: PEM certificate chain...
    tls_key_file: Path | None = None  # ...and its PEM private key (both or neither)
    # Host header values the dashboard answers (DNS rebinding); bind_address is added.
    allowed_hosts: list[str] = Field(default_factory=lambda: list(LOOPBACK_HOSTS))
    # Addresses (or networks) of reverse proxies whose X-Forwarded-For/-Proto are believed.
    trusted_proxies: list[str] = Field(default_factory=list)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, entries: list[str]) -> list[str]:
        out = []
        for entry in entries:
            host = entry.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:
                if not _HOST_NAME_RE.match(host):
                    raise ValueError(f"{entry!r} is not a host name, an IP address, "
                                     "'*.domain' or '*'") from None
            out.append(host)
        return out

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, entries: list[str]) -> list[str]:
        out = []
        for entry in entries:
            value = entry.strip()
            try:
                out.append(str(ipaddress.ip_network(value, strict=False) if "/" in value
                               else ipaddress.ip_address(value)))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return out

    @model_validator(mode="after")
    def _tls_pair(self) -> AdminSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("admin.tls_cert_file and admin.tls_key_file go together")
        return self


class ClusterSettings(_Section):
    # None: "<host name>/<AE title>" for `vaenode serve`, "<host name>/worker" for
    # `vaenode worker` (node/cluster/membership.py).
    node_name: str | None = Field(None, min_length=1, max_length=128)
    heartbeat_s: float = Field(10.0, gt=0)
    takeover_check_s: float = Field(15.0, gt=0)

    @field_validator("node_name")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError(f"{value!r} is not a printable, non-blank name")
        return value.strip() if value is not None else None


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class Settings(_Section):
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    learning: LearningSettings = Field(default_factory=LearningSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    log: LogSettings = Field(default_factory=LogSettings)


def _env_value(raw: str) -> Any:
    """Lists and tables come as JSON; everything else is left to pydantic's coercion."""
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {raw!r} ({exc})") from exc
    return raw


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``VAENODE_SECTION__KEY[__SUBKEY]=value`` variables on the parsed TOML."""
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is not a section")
            node = child
        try:
            node[path[-1]] = _env_value(raw)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
    return data


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (defaults alone when ``path`` is None), overlay env, validate.

    Raises:
        ConfigError: the file is missing or not TOML, or a key is unknown or has a bad value;
            the message names the key.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    data = apply_env(data, environ)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
