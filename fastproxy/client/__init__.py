"""A Python client for fastproxy that keeps its streams correct.

```python
from fastproxy.client import Client

async with Client("ws://127.0.0.1:8000/ws") as client:
    await client.subscribe("trade:BTCUSDT", "orderbook:50:BTCUSDT")
    async for event in client:  # .kind: "data", "status", "gap", "reconnected", "error"
        ...
```

It reconnects by itself with jittered backoff and resumes every stream where it stood; it checks
every message's `seq` and every book's `updateId`, keeps the books (`client.book(arg)`) and the
latest state (`client.state(arg)`), and yields a `gap` event whenever something is missing, never
a silent hole. The protocol logic (`core`, `book`, `sequence`) is sans-I/O.
"""

from fastproxy.client.book import Book, BookError, OrderBook
from fastproxy.client.client import AuthError, Client, ConnectionLimitError, ReconnectError
from fastproxy.client.core import ClientCore, ClientError, Event, SubscribeError
from fastproxy.client.sequence import SequenceCheck, Verdict

__all__ = [
    "AuthError",
    "Book",
    "BookError",
    "Client",
    "ClientCore",
    "ClientError",
    "ConnectionLimitError",
    "Event",
    "OrderBook",
    "ReconnectError",
    "SequenceCheck",
    "SubscribeError",
    "Verdict",
]
