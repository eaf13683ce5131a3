"""Plain HTTP access to the Prefect REST API, as the dashboard has it: the stack's server refuses a request
without its basic-auth string (all but ``GET /api/health``), and a state-changing one (POST, PUT, PATCH,
DELETE) without a CSRF token issued to the caller's client id. Prefect's own Python client does both by
itself (``PREFECT_API_AUTH_STRING``); this is for scripts and tests that speak REST directly."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from infra.settings import Settings
from infra.uris import basic_auth


def auth_header(auth_string: str | None) -> dict[str, str]:
    """``Authorization: Basic base64(auth string)``, the header Prefect's server checks (none without one)."""
    return basic_auth(auth_string)


def prefect_http(settings: Settings, **kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` on ``PREFECT_API_URL`` carrying the auth string and, where the server protects
    against CSRF, a token for a fresh client id (``kwargs`` go to ``httpx.Client``: timeout, transport)."""
    if not settings.prefect_api_url:
        raise ValueError("PREFECT_API_URL is not set; run `headbench up` or export it")
    auth = settings.prefect_api_auth_string.get_secret_value() if settings.prefect_api_auth_string else None
    kwargs.setdefault("timeout", 30)
    headers = auth_header(auth)
    client_id = uuid.uuid4().hex
    # a request of its own: the client returned must still be unopened (callers use it as a context manager)
    issued = httpx.get(f"{settings.prefect_api_url.rstrip('/')}/csrf-token", params={"client": client_id},
                       headers=headers, timeout=kwargs["timeout"])
    if issued.status_code == 200:  # 422 "CSRF protection is disabled": nothing to send
        headers |= {"Prefect-Csrf-Token": issued.json()["token"], "Prefect-Csrf-Client": client_id}
    elif issued.status_code != 422:
        issued.raise_for_status()
    return httpx.Client(base_url=settings.prefect_api_url, headers=headers, **kwargs)
