"""Drives a real ComfyUI server (the checkout's host, `paths.host_dir()`, built by scripts/setup.sh) over HTTP.

Only the standard library is used, so the helper works in any interpreter that can run the tests.
Each server gets its own temporary base directory (models, custom_nodes, input, output, temp, user,
database and log), so tests never write into the checkout and parallel servers never collide.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

from . import paths

PACK_FOLDER = "ComfyUI-TuneQDM"


class ComfyError(RuntimeError):
    """The server refused or failed a request; `details` holds its JSON answer when there was one."""

    def __init__(self, message: str, details: Any = None, status: int | None = None) -> None:
        super().__init__(message)
        self.details = details
        self.status = status


class ComfyServer:
    """One ComfyUI server process on 127.0.0.1, started from `comfy_dir/main.py` (default: the checkout's
    host) with `python` (default: the checkout's .venv).

    `custom_nodes` maps folder names to the directories linked into the server's custom_nodes/;
    by default this checkout is linked as ComfyUI-TuneQDM, the way a user installs the pack.
    """

    def __init__(
        self,
        comfy_dir: Path | None = None,
        python: Path | None = None,
        custom_nodes: dict[str, Path] | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,  # a 2-core machine busy with other servers can take minutes
    ) -> None:
        self.comfy_dir = paths.host_dir() if comfy_dir is None else Path(comfy_dir)
        self.python = paths.python() if python is None else Path(python)
        self.custom_nodes = {PACK_FOLDER: paths.checkout()} if custom_nodes is None else custom_nodes
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.client_id = uuid.uuid4().hex
        self.port: int | None = None
        self.base_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._final_log = ""

    # ---- life cycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    _MEMORY_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")

    def memory(self) -> dict[str, int]:
        """The server process's peak (VmHWM) and current resident memory, anonymous and file-backed, in
        bytes, from /proc; empty where the process or /proc is not there."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except (OSError, TypeError):
            return {}
        out = {}
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in self._MEMORY_FIELDS:
                out[key] = int(value.split()[0]) * 1024
        return out

    def peak_rss(self) -> int:
        """The server process's peak resident memory (VmHWM) in bytes."""
        peak = self.memory().get("VmHWM")
        if peak is None:
            raise RuntimeError(f"no VmHWM for the server (pid {self.pid})")
        return peak

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self._dir("output")

    @property
    def input_dir(self) -> Path:
        return self._dir("input")

    @property
    def models_dir(self) -> Path:
        return self._dir("models")

    @property
    def log_path(self) -> Path:
        return self._dir("server.log")

    def _dir(self, name: str) -> Path:
        if self.base_dir is None:
            raise RuntimeError("server not started")
        return self.base_dir / name

    def start(self) -> "ComfyServer":
        if self._proc is not None:
            raise RuntimeError("server already started")
        if not (self.comfy_dir / "main.py").is_file():
            raise FileNotFoundError(f"{self.comfy_dir}/main.py missing: run `make setup` first")
        self.base_dir = Path(tempfile.mkdtemp(prefix="comfy-host-"))
        for sub in ("models", "custom_nodes", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir()
        for name, target in self.custom_nodes.items():
            (self.base_dir / "custom_nodes" / name).symlink_to(Path(target).resolve())
        self.port = _free_port()
        cmd = [
            str(self.python), "main.py",
            "--cpu",
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--disable-auto-launch",
            # Models, custom_nodes, input, output, temp and user all live under the base directory.
            "--base-directory", str(self.base_dir),
            # The default database sits in comfy_dir/user: keep it per server too.
            "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
            # API nodes call out to the internet; the tests never need them, and start-up is faster.
            "--disable-api-nodes",
            *self.extra_args,
        ]
        # Inherit the caller's environment (TRITON_INTERPRET from conftest.py reaches the server).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log_file = open(self.log_path, "wb")
        self._proc = subprocess.Popen(
            cmd, cwd=self.comfy_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)  # a crashed test session must not leave the server running
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                tail = self.log_tail()
                self.stop()
                raise ComfyError(f"ComfyUI exited with code {code} during start-up:\n{tail}")
            try:
                self._request("GET", "/object_info", timeout=10)
                return
            except (OSError, ComfyError):
                pass  # not listening yet (connection refused) or still loading nodes
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ComfyError(f"ComfyUI not ready after {self.startup_timeout:.0f} s:\n{tail}")
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminates the server by its own pid (SIGTERM, then SIGKILL) and removes its files."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            self._final_log = self.log_text()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- logs ---------------------------------------------------------------------------------

    def log_text(self) -> str:
        if self.base_dir is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return self._final_log

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- API ----------------------------------------------------------------------------------

    def object_info(self) -> dict[str, Any]:
        return self._request("GET", "/object_info")

    def queue(self, api_graph: dict[str, Any]) -> str:
        """Queues an API-format graph and returns its prompt id; HTTP 400 raises ComfyError, and so does a
        graph that ComfyUI accepted only in part (it runs the valid outputs and lists the others in
        `node_errors`), so that a half-broken graph never passes for a working one."""
        answer = self._request("POST", "/prompt", {"prompt": api_graph, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise ComfyError(f"ComfyUI rejected part of the graph: {json.dumps(answer['node_errors'])[:2000]}",
                             answer["node_errors"])
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0,
             on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
        """Waits until the prompt finished (success, error or interrupt); returns its history entry.
        `on_poll()` runs between polls (the demo prints progress from it).

        ComfyUI adds a prompt to /history only when its execution ended, so the first entry seen is
        final; `entry["status"]["messages"]` holds the execution messages (execution_error among them).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self._request("GET", f"/history/{prompt_id}").get(prompt_id)
            if entry and "status" in entry:
                return entry
            if self._proc is None or self._proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if on_poll is not None:
                on_poll()
            time.sleep(0.1)
        self.interrupt()  # free the worker for the next test
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, api_graph: dict[str, Any], timeout: float = 300.0, check: bool = False,
            on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
        """queue + wait; with check=True an execution error raises ComfyError naming the node."""
        entry = self.wait(self.queue(api_graph), timeout, on_poll)
        error = self.execution_error(entry)
        if check and error is not None:
            raise ComfyError(
                f"node {error.get('node_id')} ({error.get('node_type')}) failed: "
                f"{error.get('exception_type')}: {error.get('exception_message')}", error)
        return entry

    @staticmethod
    def execution_error(history_entry: dict[str, Any]) -> dict[str, Any] | None:
        """The data of the entry's `execution_error` message (node_id, exception_message, ...), if any."""
        for name, data in history_entry.get("status", {}).get("messages", []):
            if name == "execution_error":
                return data
        return None

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", {})

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        if self.port is None:
            raise RuntimeError("server not started")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                details: Any = json.loads(text)
            except ValueError:
                details = text
            raise ComfyError(f"{method} {path} -> HTTP {err.code}: {text}", details, err.code) from None
        return json.loads(raw) if raw else None


def _free_port() -> int:
    # Port 0 lets the kernel choose a free port; the tiny window before ComfyUI binds it is acceptable.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
