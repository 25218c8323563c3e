"""A real Label Studio for tests: the server from its own venv, and its users as a person's
browser and client would act (sign up, answer a task)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, free_port, wait_until_up

VENV = REPO / ".venv-labelstudio"


@dataclass(frozen=True)
class LabelStudioServer:
    """A running Label Studio: its URL and its first user (an admin) with an API token."""

    url: str
    email: str
    token: str


@contextmanager
def running_label_studio(folder: Path) -> Iterator[LabelStudioServer]:
    """Label Studio offline on a free loopback port with sqlite in ``folder`` (about 40 s to
    start: migrations), stopped by its process id at the end."""
    executable = VENV / "bin" / "label-studio"
    if not executable.exists():
        pytest.skip(f"Label Studio's venv {VENV} is missing: `make labelstudio` builds it")
    port = free_port()
    server = LabelStudioServer(f"http://127.0.0.1:{port}", "admin@example.com", "admin-token")
    env = os.environ | {
        "LABEL_STUDIO_USERNAME": server.email,
        "LABEL_STUDIO_PASSWORD": "admin-password",
        "LABEL_STUDIO_USER_TOKEN": server.token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "0",
        "LATEST_VERSION_CHECK": "false",
    }
    command = [executable, "start", "--no-browser", "--internal-host", "127.0.0.1"]
    command += ["-p", str(port), "--data-dir", folder / "data"]
    log = folder / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=folder
        )
    try:
        wait_until_up(f"{server.url}/health", process, 300, lambda: log.read_text()[-2000:])
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sign_up(server: LabelStudioServer, email: str, password: str) -> str:
    """A new user, signed up through the web form as a person does; their API token."""
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        browser.get("/user/signup/").raise_for_status()
        form = {"email": email, "password": password}
        form["csrfmiddlewaretoken"] = browser.cookies["csrftoken"]
        referer = {"Referer": f"{server.url}/user/signup/"}
        page = browser.post("/user/signup/", data=form, headers=referer)
        assert page.status_code == 302, page.text[:500]
        return browser.get("/api/current-user/token").raise_for_status().json()["token"]


def answer(
    server: LabelStudioServer, token: str, task: int, choice: str | None, lead_time: float = 5.0
) -> dict[str, Any]:
    """Submit an annotation of ``task`` as the token's user (``None``: skip the task)."""
    result = []
    if choice is not None:
        value = {"choices": [choice]}
        result = [
            {"from_name": "preference", "to_name": "response_1", "type": "choices", "value": value}
        ]
    body = {"result": result, "lead_time": lead_time, "was_cancelled": choice is None}
    response = httpx.post(
        f"{server.url}/api/tasks/{task}/annotations/",
        json=body,
        headers={"Authorization": f"Token {token}"},
        timeout=30,
    )
    return response.raise_for_status().json()
