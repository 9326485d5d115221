"""The node's side of the agent API: HTTP with the node token, retrying what a restart of the web app
or a network blip would lose. No Django here: a GPU node needs only the server's URL and its token."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import requests

log = logging.getLogger(__name__)


class AgentError(Exception):
    """The server refused the request for good (4xx other than those the caller handles)."""

    def __init__(self, status: int, body: object) -> None:
        self.status, self.body = status, body
        super().__init__(f"HTTP {status}: {body}")


def read_token(token: str | None = None, token_file: str | None = None) -> str:
    """The node token from the flag, else DEEPOPT_NODE_TOKEN, else a file (flag or DEEPOPT_NODE_TOKEN_FILE)."""
    token = token or os.environ.get("DEEPOPT_NODE_TOKEN")
    if token:
        return token.strip()
    path = token_file or os.environ.get("DEEPOPT_NODE_TOKEN_FILE")
    if path:
        return Path(path).read_text().strip()
    raise SystemExit("No node token: pass --token, set DEEPOPT_NODE_TOKEN, or point DEEPOPT_NODE_TOKEN_FILE "
                     "at a file holding it (POST /api/v1/nodes/ returns it once).")


class AgentClient:
    def __init__(self, server: str, token: str, *, timeout: float = 15.0) -> None:
        self.base = server.rstrip("/") + "/api/v1/agent/"
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Node {token}", "Accept": "application/json"})

    def request(self, method: str, path: str, *, retry_for: float = 0.0, ok: tuple[int, ...] = (200,),
                **kwargs) -> tuple[int, dict]:
        """Send; retry connection errors and 5xx answers for up to `retry_for` seconds.

        Returns (status, body) for 2xx and for statuses in `ok`; raises AgentError for other 4xx and
        requests' errors once the retries are spent.
        """
        deadline = time.monotonic() + retry_for
        delay = 0.2
        while True:
            try:
                for value in (kwargs.get("files") or {}).values():
                    handle = value[1] if isinstance(value, tuple) else value
                    if hasattr(handle, "seek"):
                        handle.seek(0)  # a retried upload starts from the beginning
                response = self.session.request(method, self.base + path, timeout=self.timeout, **kwargs)
            except requests.RequestException as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s %s failed (%s); retrying in %.1f s", method, path, exc, delay)
            else:
                if response.status_code < 500:
                    body = _json(response)
                    if response.ok or response.status_code in ok:
                        return response.status_code, body
                    raise AgentError(response.status_code, body)
                if time.monotonic() + delay > deadline:
                    raise AgentError(response.status_code, _json(response))
                log.warning("%s %s answered %s; retrying in %.1f s", method, path, response.status_code, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def download(self, path: str, dest: Path, *, retry_for: float = 60.0) -> int:
        """GET a file into `dest` (written to a temporary name, then renamed); its size. Retries as
        `request` does; another 4xx raises AgentError."""
        deadline = time.monotonic() + retry_for
        delay = 0.2
        partial = dest.with_name(dest.name + ".part")
        while True:
            try:
                with self.session.get(self.base + path, timeout=self.timeout, stream=True) as response:
                    if response.ok:
                        try:
                            with partial.open("wb") as handle:
                                for chunk in response.iter_content(1 << 20):
                                    handle.write(chunk)
                            partial.replace(dest)
                        finally:
                            partial.unlink(missing_ok=True)  # a cut-off transfer leaves nothing behind
                        return dest.stat().st_size
                    if response.status_code < 500 or time.monotonic() + delay > deadline:
                        raise AgentError(response.status_code, _json(response))
            except requests.RequestException as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("GET %s failed (%s); retrying in %.1f s", path, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def post(self, path: str, body: dict | None = None, **kwargs) -> tuple[int, dict]:
        return self.request("POST", path, json=body, **kwargs)

    def close(self) -> None:
        self.session.close()


def _json(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {"detail": response.text[:500]}
    return body if isinstance(body, dict) else {"data": body}
