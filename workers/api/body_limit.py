"""Request bodies larger than ``DBAAS_API_MAX_BODY_BYTES`` are refused with 413 before any
of it is parsed: at once by ``Content-Length``, or as soon as a chunked body grows past
the limit. uvicorn has no such limit; FastAPI's ``max_body_size`` answers some of its
413s as plain text, which python-troveclient cannot read."""

from workers.api.errors import fault


class LimitBody:
    """ASGI middleware: reads the (small) body whole, within the limit, and hands it on."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = fault(413, f"Request body larger than {self.limit} bytes.")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # only a disconnect can follow
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
