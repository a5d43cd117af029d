"""nginx configurations for the benchmark: the upstream and the reference proxy.

Both run in the foreground (`daemon off`) with every path (pid, logs, temp files)
inside a private prefix directory, so nothing touches the system nginx.
"""

from __future__ import annotations

import json
from pathlib import Path

BODY_SIZE = 1024


def json_body(size: int = BODY_SIZE) -> str:
    """A JSON object of exactly `size` bytes, safe inside a single-quoted nginx string.

    No quote `'`, backslash or `$` (nginx would expand variables), ASCII only.
    """
    base = {
        "responseStatus": "success",
        "message": "ok",
        "data": {"id": "job_0123456789", "status": "succeeded", "credits": 12, "pad": ""},
    }
    empty = json.dumps(base, separators=(",", ":"))
    pad = size - len(empty)
    if pad < 0:
        raise ValueError(f"body size {size} is smaller than the skeleton ({len(empty)})")
    base["data"]["pad"] = "x" * pad  # type: ignore[index]
    body = json.dumps(base, separators=(",", ":"))
    assert len(body.encode()) == size
    assert not any(c in body for c in "'\\$")
    return body


def _common(prefix: Path, name: str) -> str:
    p = prefix
    return f"""\
worker_processes 1;
daemon off;
master_process on;
pid {p}/{name}.pid;
error_log {p}/{name}-error.log warn;
worker_rlimit_nofile 16384;

events {{
    worker_connections 8192;
    multi_accept on;
}}
"""


def _http_common(prefix: Path, name: str) -> str:
    p = prefix
    return f"""\
    access_log off;
    client_body_temp_path {p}/{name}-tmp/body;
    proxy_temp_path {p}/{name}-tmp/proxy;
    fastcgi_temp_path {p}/{name}-tmp/fastcgi;
    uwsgi_temp_path {p}/{name}-tmp/uwsgi;
    scgi_temp_path {p}/{name}-tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    server_tokens off;
"""


def upstream_conf(prefix: Path, port: int, body: str | None = None) -> str:
    """The upstream: `return 200` of a fixed 1 KB JSON body, keep-alive on."""
    body = json_body() if body is None else body
    return (
        _common(prefix, "upstream")
        + "\nhttp {\n"
        + _http_common(prefix, "upstream")
        + f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        # Two more loopback addresses: the balanced scenario's second and third target.
        listen 127.0.0.2:{port} backlog=4096;
        listen 127.0.0.3:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""
    )


def proxy_conf(prefix: Path, port: int, upstream_port: int) -> str:
    """The reference proxy: nginx in front of the upstream with pooled keep-alive."""
    return (
        _common(prefix, "proxy")
        + "\nhttp {\n"
        + _http_common(prefix, "proxy")
        + f"""
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )


def write_conf(prefix: Path, name: str, text: str) -> Path:
    """Write `<prefix>/<name>.conf` and create its temp directory."""
    (prefix / f"{name}-tmp").mkdir(parents=True, exist_ok=True)
    path = prefix / f"{name}.conf"
    path.write_text(text)
    return path
