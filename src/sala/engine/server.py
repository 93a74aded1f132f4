"""The HTTP server: OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` over one model.

    from sala.engine.server import create_app
    from sala.engine.service import Engine
    app = create_app(Engine.load("path/to/checkpoint"))      # then: uvicorn, or fastapi's TestClient

Requests run one at a time on the model (``Engine.submit``); a streaming request gets server-sent events,
``data: {...}`` per text delta and ``data: [DONE]`` last. The final response (or final chunk) carries the
usage block and a non-standard ``sala`` field: queue time, time to first token, decode tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .decoding import SamplingParams, Summary
from .protocol import ChatRequest, CompletionRequest, RequestError
from .service import Engine

_END = object()


def _validation_error(exc: RequestValidationError) -> RequestError:
    """pydantic's errors as one message that names each field at fault."""
    parts, first = [], None
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        first = first or loc
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return RequestError("; ".join(parts) or "invalid request", first)


def _summary_fields(s: Summary, chunk_size) -> dict:
    return {
        "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                  "total_tokens": s.prompt_tokens + s.completion_tokens},
        "sala": {"queue_s": round(s.queue_s, 6), "ttft_s": round(s.ttft_s, 6), "decode_s": round(s.decode_s, 6),
                 "decode_tokens_per_s": s.decode_tokens_per_s, "prefill_chunk_size": chunk_size},
    }


async def _events(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[str | Summary]:
    """Run the request on the engine's worker and hand its deltas to the event loop as they come.

    Leaving the loop early (a streaming client disconnected) tells the worker to stop after its next token.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = False
    submitted = time.perf_counter()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            pass

    def job() -> None:
        started = time.perf_counter()
        try:
            if stop:
                return
            for ev in engine.generate(prompt_ids, params, cancelled=lambda: stop):
                if isinstance(ev, Summary):
                    ev.queue_s = started - submitted
                put(ev)
        except Exception as e:  # surfaced on the event loop side
            put(e)
        finally:
            put(_END)

    engine.submit(job)
    try:
        while True:
            ev = await queue.get()
            if ev is _END:
                return
            if isinstance(ev, Exception):
                raise ev
            yield ev
    finally:
        stop = True


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="sala", version="0.1.0", description="OpenAI-compatible server for one causal LM.")
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "waiting": engine.waiting, "random_init": engine.random_init}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "sala", "max_model_len": engine.max_context}]}

    def prepare(req, prompt_ids: list[int], prompt_field: str) -> SamplingParams:
        max_tokens = engine.max_tokens_for(len(prompt_ids), req.max_tokens, prompt_field)
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                              stop=req.stop_strings())

    async def respond(req, prompt_ids, params, kind: str):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": engine.name}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant"} if first else {}
                if text:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if req.stream:
            async def stream():
                chunk_head = dict(head, object="chat.completion.chunk" if kind == "chat" else "text_completion")
                first = True
                try:
                    async for ev in _events(engine, prompt_ids, params):
                        if isinstance(ev, Summary):
                            if first and kind == "chat":
                                yield _sse(dict(chunk_head, choices=[choice(None, None, first=True)]))
                            final = dict(chunk_head, choices=[choice(None, ev.finish_reason)])
                            yield _sse({**final, **_summary_fields(ev, engine.chunk_size)})
                        else:
                            yield _sse(dict(chunk_head, choices=[choice(ev, None, first)]))
                            first = False
                except Exception as e:  # the response has started: report in-band
                    yield _sse({"error": {"message": f"generation failed: {e}", "type": "server_error"}})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        parts, summary = [], None
        async for ev in _events(engine, prompt_ids, params):
            if isinstance(ev, Summary):
                summary = ev
            else:
                parts.append(ev)
        text = "".join(parts)
        if kind == "chat":
            ch = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": summary.finish_reason}
        else:
            ch = {"index": 0, "text": text, "logprobs": None, "finish_reason": summary.finish_reason}
        return {**head, "choices": [ch], **_summary_fields(summary, engine.chunk_size)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        engine.check_model(req.model)
        ids = engine.encode_prompt(req.prompt)
        return await respond(req, ids, prepare(req, ids, "prompt"), "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        engine.check_model(req.model)
        ids = engine.encode_chat([m.as_dict() for m in req.messages])
        return await respond(req, ids, prepare(req, ids, "messages"), "chat")

    return app


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``engine`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)
