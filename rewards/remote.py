"""A reward computed by an HTTP service.

Protocol: ``POST url`` with JSON ``{"prompts": [...], "completions": [...], **columns}`` answered by
``{"rewards": [...]}`` (one number or ``null`` per completion). Connection errors, timeouts, HTTP 429 and 5xx
are retried with exponential backoff (``backoff_s * 2**attempt``, capped at ``backoff_max_s``); other HTTP errors
fail at once. Errors name the status code, the URL (credentials removed) and an excerpt of the body. The optional
bearer token is read from the environment variable named by ``token_env`` at call time and never logged or put in
an error message.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.protocol import RewardError

logger = logging.getLogger("rewards.remote")

_BODY_EXCERPT = 300


@dataclass(frozen=True)
class RemoteRewardConfig:
    """Where and how to call a reward service.

    Attributes:
        url: ``http://`` or ``https://`` endpoint.
        timeout_s: Timeout of one request (connect and read).
        max_retries: Retries after the first attempt for retryable failures.
        backoff_s: First backoff; doubles every retry.
        backoff_max_s: Longest backoff.
        token_env: Name of an environment variable holding a bearer token (``Authorization: Bearer ...``).
        batch_size: Most completions per request (default: the whole batch in one request).
        columns: Columns to send (default: every JSON-serialisable column; others are skipped).
        headers: Extra request headers (not for secrets: use ``token_env``).
        name: Name in errors and logs.
    """

    url: str
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    token_env: str | None = None
    batch_size: int | None = None
    columns: tuple[str, ...] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    name: str = "remote"

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(str(self.url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"remote reward url must be an http(s) URL, got {_redact(str(self.url))!r}")
        if not self.timeout_s > 0 or not math.isfinite(self.timeout_s):
            raise ValueError(f"remote reward timeout_s must be a positive number, got {self.timeout_s!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"remote reward max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not self.backoff_s >= 0 or not self.backoff_max_s >= 0:
            raise ValueError("remote reward backoff_s and backoff_max_s must be >= 0")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"remote reward batch_size must be a positive integer, got {self.batch_size!r}")
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(self.columns))
        for key in self.headers:
            if key.lower() == "authorization":
                raise ValueError("remote reward headers must not carry credentials; use token_env")


def _redact(url: str) -> str:
    """``url`` without user:password."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class _Retryable(Exception):
    """A failure worth retrying; carries the message for the final error."""


class RemoteReward:
    """Calls a reward service (see the module docstring); follows the reward protocol.

    Args:
        config: The service; or pass :class:`RemoteRewardConfig` fields as keyword arguments.
    """

    def __init__(self, config: RemoteRewardConfig | None = None, **fields: Any) -> None:
        if config is not None and fields:
            raise ValueError("remote reward: pass either config or its fields, not both")
        self.config = config or RemoteRewardConfig(**fields)
        self.name = self.config.name
        self._url = _redact(self.config.url)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        payload_columns = self._columns(columns, len(completions))
        size = self.config.batch_size or max(len(completions), 1)
        scores: list[float | None] = []
        for start in range(0, len(completions), size):
            part = slice(start, start + size)
            chunk = {k: v[part] if _per_sample(v, len(completions)) else v for k, v in payload_columns.items()}
            payload = {"prompts": list(prompts[part]), "completions": list(completions[part]), **chunk}
            scores.extend(self._post(payload, len(payload["completions"])))
        return scores

    def _columns(self, columns: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
        if self.config.columns is not None:
            missing = [c for c in self.config.columns if c not in columns]
            if missing:
                raise RewardError(self.name, f"columns {missing} are not in the batch ({sorted(columns)})")
            chosen = {c: columns[c] for c in self.config.columns}
            for key, value in chosen.items():
                try:
                    json.dumps(value)
                except (TypeError, ValueError) as exc:
                    raise RewardError(self.name, f"column {key!r} is not JSON-serialisable: {exc}") from None
            return chosen
        chosen = {}
        for key, value in columns.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                logger.debug("remote reward %s: column %r is not JSON-serialisable, not sent", self.name, key)
                continue
            chosen[key] = value
        return chosen

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.config.headers}
        if self.config.token_env:
            token = os.environ.get(self.config.token_env)
            if not token:
                raise RewardError(self.name, f"environment variable {self.config.token_env!r} (the auth token) "
                                             "is not set or empty")
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _post(self, payload: dict[str, Any], expected: int) -> list[float | None]:
        body = json.dumps(payload).encode()
        headers = self._headers()
        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            request = urllib.request.Request(cfg.url, data=body, headers=headers, method="POST")
            try:
                return self._parse(self._send(request), expected)
            except _Retryable as exc:
                if attempt == cfg.max_retries:
                    raise RewardError(self.name, f"POST {self._url} failed after {attempt + 1} attempt(s): {exc}") \
                        from None
                delay = min(cfg.backoff_s * 2**attempt, cfg.backoff_max_s)
                logger.warning("remote reward %s: POST %s attempt %d failed (%s); retrying in %.2f s",
                               self.name, self._url, attempt + 1, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _send(self, request: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            excerpt = exc.read()[:_BODY_EXCERPT].decode(errors="replace")
            message = f"HTTP {exc.code} {exc.reason}; body: {excerpt!r}"
            if exc.code >= 500 or exc.code == 429:
                raise _Retryable(message) from None
            raise RewardError(self.name, f"POST {self._url} returned {message}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"{type(exc).__name__}: {reason}") from None

    def _parse(self, raw: bytes, expected: int) -> list[float | None]:
        excerpt = raw[:_BODY_EXCERPT].decode(errors="replace")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise RewardError(self.name, f"POST {self._url} answered non-JSON: {excerpt!r}") from None
        rewards = data.get("rewards") if isinstance(data, dict) else None
        if not isinstance(rewards, list) or len(rewards) != expected:
            raise RewardError(self.name, f"POST {self._url} must answer {{'rewards': [{expected} numbers]}}, "
                                         f"got {excerpt!r}")
        return rewards


def _per_sample(value: Any, batch_size: int) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == batch_size
