"""What may be recorded of a URI. A dataset URL can carry credentials (``https://user:pass@host/...``) or a
signed query string (a presigned S3 URL's ``X-Amz-Signature``); requests use the URL as given, and every
copy that is written down (MLflow params, tags and datasets, the manifest, Prefect artifacts and run names,
logs, error lines) goes through ``public_uri`` first. A URL's credentials, or a service's login, travel as HTTP
basic auth (``basic_auth``)."""

from __future__ import annotations

import base64
from urllib.parse import urlsplit, urlunsplit


def basic_auth(login: str | None) -> dict[str, str]:
    """``{"Authorization": "Basic base64(user:password)"}`` for a ``user:password`` login (MLflow's, Prefect's auth
    string, a URL's userinfo); no header without one."""
    if not login:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}


def public_uri(uri: str) -> str:
    """``uri`` without its userinfo, query string and fragment: ``https://u:p@host/a.zip?sig=x`` ->
    ``https://host/a.zip``. A path, or text that is no URL, comes back as it is."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:  # an unparsable URL: keep only what precedes anything that could hold a secret
        return uri.split("?", 1)[0].split("#", 1)[0].split("@")[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_url(url: str) -> str:
    """postgresql://user:secret@host -> postgresql://user:***@host: a server URL in an error line, the user
    kept (which login failed), the password never shown."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{creds}{at}{host}"


def public_name(uri: str) -> str:
    """The last path segment of ``uri``'s public form (a file or dataset name for run names and logs)."""
    return public_uri(uri).rstrip("/").rsplit("/", 1)[-1] or public_uri(uri)
