"""A small OpenAI-compatible chat-completions server for the tests: real SmolLM2 answers
(through ``HFBackend``), with faults injected on demand.

    python tests/openai_server.py --port 8123 [--api-key KEY]

``POST /faults`` with ``{"faults": [{"status": 429}, {"status": 500}, {"delay_s": 3}]}`` queues
faults; each chat request takes the next one (an error status instead of an answer, or a delay
before it). ``GET /stats`` counts the requests and the faults served. Supports vLLM's
``continue_final_message`` (a final assistant message is continued) and first-token
``logprobs``/``top_logprobs``.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from collections import deque
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipelines.core.config import LLMConfig
from pipelines.llm.backends import HFBackend, Sampling


def build_app(backend: HFBackend, api_key: str | None) -> FastAPI:
    app = FastAPI()
    faults: deque[dict[str, Any]] = deque()
    stats = {"requests": 0, "faults_served": 0, "unauthorized": 0, "json_schema": 0}
    auth = {"api_key": api_key}
    lock = threading.Lock()

    @app.post("/auth")
    def require_key(body: dict[str, Any]) -> dict[str, bool]:
        """Require this bearer key from now on (``null``: none); reset restores the start one."""
        auth["api_key"] = body.get("api_key")
        return {"required": auth["api_key"] is not None}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/faults")
    def add_faults(body: dict[str, Any]) -> dict[str, int]:
        faults.extend(body.get("faults", []))
        return {"queued": len(faults)}

    @app.get("/stats")
    def get_stats() -> dict[str, int]:
        return stats

    @app.post("/stats/reset")
    def reset() -> dict[str, int]:
        faults.clear()
        stats.update(dict.fromkeys(stats, 0))
        auth["api_key"] = api_key
        return stats

    @app.post("/v1/chat/completions")
    def chat(body: dict[str, Any], request: Request) -> Any:
        stats["requests"] += 1
        stats["json_schema"] += (body.get("response_format") or {}).get("type") == "json_schema"
        sent = request.headers.get("authorization", "")
        if auth["api_key"] and sent != f"Bearer {auth['api_key']}":
            stats["unauthorized"] += 1  # echoes the key sent, as some servers do
            message = f"incorrect API key provided: {sent.removeprefix('Bearer ')}"
            return JSONResponse({"error": {"message": message}}, status_code=401)
        fault = faults.popleft() if faults else {}
        if fault:
            stats["faults_served"] += 1
        if "status" in fault:
            return JSONResponse(
                {"error": {"message": f"injected {fault['status']}"}},
                status_code=fault["status"],
                headers={"retry-after-ms": "50"},
            )
        time.sleep(fault.get("delay_s", 0))
        messages = body["messages"]  # a final assistant message is continued
        sampling = Sampling(
            temperature=body.get("temperature") or 0.0,
            top_p=body.get("top_p") or 1.0,
            max_tokens=body.get("max_tokens") or 64,
            seed=body.get("seed") or 0,
            logprobs=bool(body.get("logprobs")),
        )
        with lock:
            generation = backend.generate([messages], sampling)[0]
        if generation.error:
            return JSONResponse({"error": {"message": generation.error}}, status_code=400)
        logprobs = None
        if generation.first_logprobs:
            top = sorted(generation.first_logprobs.items(), key=lambda kv: -kv[1])
            top = top[: body.get("top_logprobs") or 1]
            logprobs = {
                "content": [
                    {
                        "token": top[0][0],
                        "logprob": top[0][1],
                        "bytes": None,
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": None} for t, lp in top
                        ],
                    }
                ]
            }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "finish_reason": "stop",
                    "logprobs": logprobs,
                }
            ],
            "usage": {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.output_tokens,
                "total_tokens": generation.prompt_tokens + generation.output_tokens,
            },
        }

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=LLMConfig().model)
    parser.add_argument("--api-key")
    args = parser.parse_args()
    app = build_app(HFBackend(LLMConfig(model=args.model)), args.api_key)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
