"""A small OpenAI-compatible chat-completions server for the tests: real SmolLM2 answers
(through ``HFBackend``), or scripted ones (``--scripted``: no model, the longer response wins,
for the tests of orchestration: cache, missing rows, retries, verdicts), with faults injected
on demand.

    python tests/openai_server.py --port 8123 [--api-key KEY] [--scripted]

``POST /faults`` with ``{"faults": [{"status": 429}, {"status": 500}, {"delay_s": 3}]}`` queues
faults; each chat request takes the next one (an error status instead of an answer, or a delay
before it). ``GET /stats`` counts the requests and the faults served. Supports vLLM's
``continue_final_message`` (a final assistant message is continued) and first-token
``logprobs``/``top_logprobs``.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
import uuid
from collections import deque
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipelines.core.config import LLMConfig
from pipelines.llm.backends import Generation, HFBackend, Sampling


class ScriptedEngine:
    """Answers a pairwise judge prompt without a model: the longer response wins, with
    probability 0.9 (logprobs) or as ``{"winner": ...}`` (structured). The rule is known, so a
    test can predict every judgment and verdict."""

    def generate(self, prompts: list[list[dict[str, str]]], sampling: Sampling) -> list[Generation]:
        messages = prompts[0]
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        if "[Response A]\n" not in user:
            return [Generation(text="I am a scripted judge.", prompt_tokens=len(user.split()))]
        # The last pair shown is the one judged (few-shot examples come first).
        response_a, _, rest = user.rsplit("[Response A]\n", 1)[1].partition("\n\n[Response B]\n")
        response_b = rest.rsplit("\n\nWhich response is better?", 1)[0]
        winner = "A" if len(response_a) >= len(response_b) else "B"
        loser = "B" if winner == "A" else "A"
        tokens = len(user.split())
        if sampling.logprobs:
            firsts = {winner: math.log(0.9), loser: math.log(0.1)}
            return [Generation(winner, firsts, prompt_tokens=tokens, output_tokens=1)]
        return [Generation(f'{{"winner": "{winner}"}}', prompt_tokens=tokens, output_tokens=5)]


def build_app(backend: HFBackend | ScriptedEngine, api_key: str | None) -> FastAPI:
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
    parser.add_argument("--scripted", action="store_true", help="no model: scripted answers")
    args = parser.parse_args()
    engine = ScriptedEngine() if args.scripted else HFBackend(LLMConfig(model=args.model))
    app = build_app(engine, args.api_key)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
