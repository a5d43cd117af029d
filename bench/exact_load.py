"""Send exactly N keyed GET requests and count the answers: for row accounting.

wrk cannot stop at a request count, so the "every request is a row" check uses this
instead: N requests over C keep-alive connections, pipelined in windows, every
response parsed (httptools), so that what was sent and answered is known exactly.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httptools

WINDOW = 32  # requests in flight per connection


class _Answers:
    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.done = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.statuses[self.parser.get_status_code()] += 1
        self.done += 1


async def _connection(port: int, request: bytes, count: int) -> Counter[int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = _Answers()
    sent = 0
    try:
        while answers.done < count:
            window = min(WINDOW - (sent - answers.done), count - sent)
            if window > 0:
                writer.write(request * window)
                sent += window
            data = await reader.read(65536)
            if not data:
                raise ConnectionError(f"closed after {answers.done} of {count} answers")
            answers.parser.feed_data(data)
    finally:
        writer.close()
    return answers.statuses


async def _run(port: int, headers: tuple[str, ...], total: int, connections: int) -> Counter[int]:
    extra = "".join(f"{h}\r\n" for h in headers)
    request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()
    shares = [total // connections + (1 if i < total % connections else 0)
              for i in range(connections)]
    results = await asyncio.gather(*(_connection(port, request, n) for n in shares if n))
    out: Counter[int] = Counter()
    for r in results:
        out.update(r)
    return out


def send_exactly(
    port: int, headers: tuple[str, ...], total: int, connections: int = 16
) -> Counter[int]:
    """Statuses of exactly `total` answered requests (raises if any is missing)."""
    return asyncio.run(_run(port, headers, total, connections))
