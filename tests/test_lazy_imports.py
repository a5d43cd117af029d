"""What a gateway without PostgreSQL, Redis or DNS discovery never loads.

Each of these packages costs a serving process megabytes of memory (the PostgreSQL
dialect 4.6 MB, dnspython 1.6 MB, redis-py about 6 MB): they are imported where
a configuration first asks for them, not by the modules every gateway loads.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import tollway.cli
import tollway.gateway.app
import tollway.admin.server
from tollway.config.loader import load_config_text
from tollway.config.snapshot import build_snapshot
build_snapshot(load_config_text('''
services:
  - name: up
    url: http://127.0.0.1:9
routes:
  - name: api
    service: up
    paths: [/api]
plugins:
  - name: key-auth
  - name: rate-limit
    config: {limits: [{per: minute, limit: 10}]}
''', "probe"))
heavy = ("dns", "sqlalchemy.dialects.postgresql", "redis", "asyncpg")
print(" ".join(m for m in heavy if m in sys.modules))
"""


def test_serving_modules_leave_optional_backends_unloaded() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "", out.stdout
