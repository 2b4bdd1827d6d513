"""The edge's settings: bodies, rate limits, proxies, the redirect's cookie, the spool,
idempotency and the connection timeouts."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode

from .base import CONFIG, renamed


class EdgeSettings(BaseSettings):
    model_config = CONFIG

    # edge ----------------------------------------------------------------------------
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    batch_max_bytes: int = Field(1 << 20, ge=1024, description="Body cap of the batch endpoint (after gzip).")
    max_string_length: int = Field(2048, ge=64)
    click_rate_limit_per_min: int = Field(
        60,
        ge=1,
        validation_alias=renamed("click_rate_limit_per_min", "REFSTREAM_CLICK_RATE_LIMIT"),
        description="seed 000 route: requests/minute per IP",
    )
    public_rate_limit_per_min: int = Field(
        600,
        ge=1,
        validation_alias=renamed("public_rate_limit_per_min", "REFSTREAM_PUBLIC_RATE_LIMIT"),
        description="other public routes: requests/minute per IP",
    )
    key_rate_limit_per_min: int = Field(
        600,
        ge=1,
        validation_alias=renamed("key_rate_limit_per_min", "REFSTREAM_KEY_RATE_LIMIT"),
        description="authenticated routes: requests/minute per API key",
    )
    track_click_rate_limit_per_min: int = Field(
        120, ge=1, description="Dub's POST /track/click (browsers): requests/minute per IP"
    )
    key_cache_s: float = Field(5.0, ge=0, description="in-process API key cache: revocations land within this")
    trusted_proxies: Annotated[list[IPv4Network | IPv6Network], NoDecode] = Field(
        default_factory=list,
        description="CIDRs whose X-Forwarded-For is believed; empty: the peer address is the client.",
    )
    pipeline_max_commands: int = Field(2048, ge=1, description="Commands per Redis round trip.")
    fallback_url: str = Field("/", description="Where /r/{code} sends an unknown or inactive code.")
    click_id_param: str = Field("refstream_click_id", description="Query parameter /r/{code} appends.")
    cookie_name: str = Field("refstream_click", description="The click-id cookie /r/{code} sets.")
    cookie_domain: str | None = Field(None, description="Domain attribute of that cookie (e.g. .yoursite.com).")
    spool_dir: str = Field(".refstream-spool", description="Where public routes spool events while Redis is down.")
    spool_max_bytes: int = Field(1 << 30, ge=1 << 16, description="Spool cap; beyond it public routes answer 503.")
    spool_drain_every_s: float = Field(1.0, gt=0)
    idempotency_window_s: int = Field(
        86400, ge=1, le=30 * 86400, description="How long an idempotency key's first answer is kept for repeats."
    )
    click_pending_s: int = Field(
        3 * 86400,
        ge=0,
        description="A lead naming an unknown click id minted this recently answers 503 (retry): the click may"
        " still wait in a spool or a stream. Older or malformed ids answer 400.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A new connection's request headers must be complete within this; else it is closed."
    )
    body_timeout_s: float = Field(10.0, gt=0, description="A request body must arrive in full within this (408).")
    keepalive_timeout_s: float = Field(
        75.0, gt=0, description="An idle keep-alive connection is closed after this (longer than a balancer's 60 s)."
    )
    max_header_bytes: int = Field(
        8190, ge=1024, le=65536, description="Longest request line and header field (aiohttp's limits; 431 past it)."
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook URLs on loopback, private, link-local ... addresses (on-premises receivers)."
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_cidrs(cls, v: object) -> object:
        if isinstance(v, str):
            return [ip_network(p.strip(), strict=False) for p in v.split(",") if p.strip()]
        return v
