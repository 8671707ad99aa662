"""``SSEResponse``: the gateway's streamed answers as a lean ASGI response.

Starlette's ``StreamingResponse`` costs per chunk what a token stream cannot afford (an anyio task group
per response, its chunks sent from a task nested under it, ``str.encode`` and a dict per chunk through
the app's middleware). This response sends pre-built SSE text from one plain asyncio task, and a second
task only waits for the client's ``http.disconnect`` to cancel it (what frees the request's slots; the
ASGI server's ``send`` to a closed connection is silently dropped, so the disconnect must be listened for).

The chunks end with ``data: [DONE]``: the chunk that ends so is sent as the response's last body
message (``more_body`` false), so the finishing chunk, the usage chunk, ``[DONE]`` and the chunked
encoding's terminator leave in one write instead of four.
"""

from __future__ import annotations

import asyncio
from typing import AsyncGenerator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[str, None], headers: dict[str, str]) -> None:
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        loop = asyncio.get_running_loop()
        streamer = loop.create_task(self._stream(send))
        watcher = loop.create_task(_until_disconnect(receive))
        watcher.add_done_callback(lambda w: w.cancelled() or streamer.cancel())
        try:
            await streamer
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this request itself was cancelled: pass it on
                raise
            # else the client went away and its stream was stopped
        finally:
            watcher.cancel()

    async def _stream(self, send: Send) -> None:
        try:
            async for chunk in self.chunks:
                last = chunk.endswith(SSE_DONE)
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": not last})
                if last:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI spec 2.4 servers raise on a send to a closed connection: the client is gone
            pass
        finally:
            await self.chunks.aclose()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
