"""A real single-node Apache Kafka broker (KRaft) from the official jars on Maven Central.

No Kafka distribution to install: Maven resolves the broker and its runtime dependencies from the
small pom kept beside this file, and the jars are copied once into a cache, so later starts make no
Maven call at all. The broker runs in its own session so that ``pause()`` (SIGSTOP) can freeze it
whole, which is how the tests make the broker an ambiguous, silent peer.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

from relay.devtools.services import DevServicesError, free_ports, tail, track, untrack

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
POM = Path(__file__).with_name("kafka-pom.xml")
LOG4J2_CONFIG = Path(__file__).with_name("log4j2.properties")
MARKER = "complete"
HEAP = ("-Xms256m", "-Xmx768m")


def cache_root() -> Path:
    """``$RELAY_DEV_CACHE``, else ``~/.cache/relay-dev``: survives between runs, unlike /tmp."""
    configured = os.environ.get("RELAY_DEV_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "relay-dev"


def find_java() -> str:
    """``$JAVA_HOME/bin/java`` if ``JAVA_HOME`` is set, else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        java = Path(home) / "bin" / "java"
        if os.access(java, os.X_OK):
            return str(java)
        raise DevServicesError(f"JAVA_HOME={home} has no bin/java: fix or unset JAVA_HOME")
    found = shutil.which("java")
    if found is None:
        raise DevServicesError(
            "'java' is not on PATH and JAVA_HOME is not set: the Kafka broker needs a Java 17+ "
            "runtime (e.g. apt-get install openjdk-17-jre-headless)"
        )
    return found


def find_maven() -> str:
    found = shutil.which("mvn")
    if found is None:
        raise DevServicesError(
            "'mvn' is not on PATH: Maven fetches the Kafka broker from Maven Central on first use "
            "(e.g. apt-get install maven), or set RELAY_KAFKA_BOOTSTRAP_SERVERS to use a broker"
        )
    return found


def pom_digest(pom: Path = POM) -> str:
    """The marker's content: a changed pom invalidates the cached jars."""
    return hashlib.sha256(pom.read_bytes()).hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def broker_jars(cache: Path | None = None, pom: Path = POM) -> Path:
    """The directory of broker jars, resolved with Maven on first use.

    The marker is written only after a complete copy, and the copy goes to a scratch directory
    renamed into place, so an interrupted download is never mistaken for a good one. A file lock
    makes concurrent first starts (e.g. parallel test runs) wait for one another.
    """
    root = (cache or cache_root()) / f"kafka-{KAFKA_VERSION}"
    lib, marker = root / "lib", root / MARKER
    digest = pom_digest(pom)
    if _marker_matches(marker, digest):
        return lib
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _marker_matches(marker, digest):
            return lib
        mvn = find_maven()
        scratch = Path(tempfile.mkdtemp(prefix="lib.partial-", dir=root))
        try:
            log.info("resolving Apache Kafka %s with Maven into %s", KAFKA_VERSION, lib)
            started = time.monotonic()
            command = [
                mvn,
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={scratch}",
                "-DincludeScope=runtime",
            ]
            try:
                result = subprocess.run(
                    command, capture_output=True, text=True, check=False, timeout=1800
                )
            except subprocess.TimeoutExpired as exc:
                raise DevServicesError("Maven took over 30 minutes to fetch Kafka") from exc
            if result.returncode != 0:
                output = (result.stdout + result.stderr).strip()[-4000:]
                raise DevServicesError(
                    f"Maven could not resolve Kafka {KAFKA_VERSION} from {pom}:\n{output}"
                )
            if not any(scratch.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
                raise DevServicesError(f"Maven finished but copied no kafka jar into {scratch}")
            marker.unlink(missing_ok=True)
            if lib.exists():
                old = Path(tempfile.mkdtemp(prefix="lib.old-", dir=root))
                lib.rename(old / "lib")
                shutil.rmtree(old, ignore_errors=True)
            scratch.rename(lib)
            marker.write_text(digest + "\n")
            log.info("Kafka jars cached in %.1fs", time.monotonic() - started)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return lib


def _marker_matches(marker: Path, digest: str) -> bool:
    try:
        return marker.read_text().strip() == digest
    except OSError:
        return False


def new_cluster_id() -> str:
    """A random 22-character base64url id, as ``kafka-storage random-uuid`` makes.

    Like Kafka's own ``Uuid.randomUuid`` it never starts with '-', which the tool's argument
    parser would take for an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def broker_properties(
    *,
    port: int,
    controller_port: int,
    log_dir: Path,
    advertised: str | None = None,
    partitions: int = 3,
    auto_create_topics: bool = True,
    extra: Mapping[str, str | int | bool] | None = None,
    sasl_port: int | None = None,
    node_id: int = 1,
    voters: str | None = None,
    replication: int = 1,
    internal_port: int | None = None,
    ssl_port: int | None = None,
) -> dict[str, str]:
    """``server.properties`` for one combined broker+controller node on loopback; with
    ``sasl_port``, a second client listener there that takes SASL/SCRAM-SHA-512 (plaintext).

    Several nodes make one cluster when they share ``voters`` (``id@host:port,...``, every node's
    controller listener) and a cluster id; ``replication`` is then the replication factor of new
    and internal topics, with ``min.insync.replicas`` 2 from three nodes on. ``internal_port`` puts
    the brokers' own traffic (replication, transaction markers) on a listener of its own, so that
    a proxy in front of the client listener (``advertised``) disturbs clients only. ``ssl_port``
    adds an SSL listener; its keystore and truststore come in ``extra``.
    """
    listeners = f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}"
    advertised_listeners = f"PLAINTEXT://{advertised or f'127.0.0.1:{port}'}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    inter_broker = "PLAINTEXT"
    if internal_port is not None:
        listeners += f",INTERNAL://127.0.0.1:{internal_port}"
        advertised_listeners += f",INTERNAL://127.0.0.1:{internal_port}"
        protocols += ",INTERNAL:PLAINTEXT"
        inter_broker = "INTERNAL"
    if ssl_port is not None:
        listeners += f",SSL://127.0.0.1:{ssl_port}"
        advertised_listeners += f",SSL://127.0.0.1:{ssl_port}"
        protocols += ",SSL:SSL"
    sasl: dict[str, str | int | bool] = {}
    if sasl_port is not None:
        listeners += f",SASL://127.0.0.1:{sasl_port}"
        advertised_listeners += f",SASL://127.0.0.1:{sasl_port}"
        protocols += ",SASL:SASL_PLAINTEXT"
        sasl = {
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
        }
    min_isr = 2 if replication >= 3 else 1
    props: dict[str, str | int | bool] = {
        "process.roles": "broker,controller",
        "node.id": node_id,
        "controller.quorum.voters": voters or f"{node_id}@127.0.0.1:{controller_port}",
        "listeners": listeners,
        "advertised.listeners": advertised_listeners,
        "listener.security.protocol.map": protocols,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": inter_broker,
        "log.dirs": str(log_dir),
        "num.partitions": partitions,
        "auto.create.topics.enable": auto_create_topics,
        "default.replication.factor": replication,
        "offsets.topic.replication.factor": replication,
        "transaction.state.log.replication.factor": replication,
        "transaction.state.log.min.isr": min_isr,
        "min.insync.replicas": min_isr,
        "group.initial.rebalance.delay.ms": 0,
        # Fewer internal partitions: faster first consumer group and first transaction.
        "offsets.topic.num.partitions": 3,
        "transaction.state.log.num.partitions": 3,
        **sasl,
        **(extra or {}),
    }
    return {key: _property_text(value) for key, value in props.items()}


def _property_text(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _escape(text: str, *, key: bool) -> str:
    out = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if key:
        for char in "=: #!":
            out = out.replace(char, "\\" + char)
    elif out.startswith(" "):
        out = "\\" + out
    return out


def render_properties(props: Mapping[str, str]) -> str:
    """Java ``.properties`` text, escaped so that any value reads back as written."""
    return "".join(f"{_escape(k, key=True)}={_escape(v, key=False)}\n" for k, v in props.items())


class LocalKafka:
    """One broker process in a temporary directory, on two free loopback ports.

    ``advertised`` ("host:port") replaces the address clients are told to use, so a test can put
    a TCP proxy in front; readiness is still checked on the real port. ``extra_properties`` adds
    or overrides broker properties (e.g. ``message.max.bytes``, ``transaction.max.timeout.ms``).
    ``scram_users`` (name -> password) adds a SASL_PLAINTEXT listener taking SCRAM-SHA-512 for
    these users, at ``sasl_bootstrap_servers``; the plaintext listener stays for everything else.
    ``internal_listener`` gives the broker's own traffic a listener of its own (see
    :func:`broker_properties`); ``ssl_properties`` adds an SSL listener with these settings
    (keystore, truststore, ``ssl.client.auth``), at ``ssl_bootstrap_servers``. A node of a
    :class:`KafkaCluster` is made by the cluster, with its ``node_id``, ``voters`` and
    ``cluster_id``.
    """

    def __init__(
        self,
        *,
        partitions: int = 3,
        auto_create_topics: bool = True,
        advertised: str | None = None,
        port: int | None = None,
        extra_properties: Mapping[str, str | int | bool] | None = None,
        start_timeout_s: float = 60.0,
        scram_users: Mapping[str, str] | None = None,
        internal_listener: bool = False,
        ssl_properties: Mapping[str, str | int | bool] | None = None,
        node_id: int = 1,
        controller_port: int | None = None,
        voters: str | None = None,
        cluster_id: str | None = None,
        replication: int = 1,
    ) -> None:
        if port is None:
            self.port = free_ports(1)[0]
        else:
            self.port = port
        self.controller_port = controller_port or free_ports(1)[0]
        self._fixed_port = port is not None or controller_port is not None
        self.scram_users = dict(scram_users or {})
        self.sasl_port: int | None = free_ports(1)[0] if self.scram_users else None
        self.internal_port: int | None = free_ports(1)[0] if internal_listener else None
        self.ssl_properties = dict(ssl_properties or {})
        self.ssl_port: int | None = free_ports(1)[0] if ssl_properties is not None else None
        self.node_id = node_id
        self.voters = voters
        self.cluster_id = cluster_id
        self.replication = replication
        self.partitions = partitions
        self.auto_create_topics = auto_create_topics
        self.advertised = advertised
        self.extra_properties = dict(extra_properties or {})
        self.start_timeout_s = start_timeout_s
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return self.advertised or f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        if self.sasl_port is None:
            raise DevServicesError("this broker has no SASL listener (no scram_users)")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap_servers(self) -> str:
        if self.ssl_port is None:
            raise DevServicesError("this broker has no SSL listener (no ssl_properties)")
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        """The broker JVM's pid, which also names its process group."""
        if self.process is None:
            raise DevServicesError("the Kafka broker is not started")
        return self.process.pid

    @property
    def log_path(self) -> Path:
        if self.root is None:
            raise DevServicesError("the Kafka broker is not started")
        return self.root / "broker.log"

    @property
    def config_path(self) -> Path:
        if self.root is None:
            raise DevServicesError("the Kafka broker is not started")
        return self.root / "server.properties"

    def properties(self) -> dict[str, str]:
        assert self.root is not None
        return broker_properties(
            port=self.port,
            controller_port=self.controller_port,
            log_dir=self.root / "data",
            advertised=self.advertised,
            partitions=self.partitions,
            auto_create_topics=self.auto_create_topics,
            extra={**self.ssl_properties, **self.extra_properties},
            sasl_port=self.sasl_port,
            node_id=self.node_id,
            voters=self.voters,
            replication=self.replication,
            internal_port=self.internal_port,
            ssl_port=self.ssl_port,
        )

    def start(self) -> None:
        """Format the storage, start the broker, return once it serves metadata."""
        if self.root is not None:
            raise DevServicesError("the Kafka broker is already started")
        started = time.monotonic()
        java = find_java()
        lib = broker_jars()
        self.root = Path(tempfile.mkdtemp(prefix="relay-kafka-"))
        track(self, self.stop)
        try:
            for attempt in range(3):
                self._format(java, lib)
                self._launch(java, lib)
                try:
                    self._wait_ready(deadline=time.monotonic() + self.start_timeout_s)
                    break
                except _PortTaken:
                    if self._fixed_port or attempt == 2:
                        raise DevServicesError(
                            f"the Kafka broker could not bind its ports:\n{tail(self.log_path)}"
                        ) from None
                    log.info("a Kafka port was taken meanwhile; retrying on other ones")
                    self._terminate()
                    shutil.rmtree(self.root / "data", ignore_errors=True)
                    self.port, self.controller_port = free_ports(2)
                    if self.sasl_port is not None:
                        self.sasl_port = free_ports(1)[0]
                    if self.internal_port is not None:
                        self.internal_port = free_ports(1)[0]
                    if self.ssl_port is not None:
                        self.ssl_port = free_ports(1)[0]
        except BaseException:
            self.stop()
            raise
        log.info(
            "Kafka %s ready on %s in %.1fs (%s)",
            KAFKA_VERSION,
            self.bootstrap_servers,
            time.monotonic() - started,
            self.root,
        )

    def _java_command(self, java: str, lib: Path, *args: str) -> list[str]:
        return [
            java,
            "-cp",
            f"{lib}/*",
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-Djava.awt.headless=true",
            *args,
        ]

    def _format(self, java: str, lib: Path) -> None:
        self.config_path.write_text(render_properties(self.properties()))
        # A short-lived tool: the C1 compiler alone starts it faster.
        command = self._java_command(
            java,
            lib,
            "-XX:TieredStopAtLevel=1",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self.cluster_id or new_cluster_id(),
            "-c",
            str(self.config_path),
            *self._scram_arguments(),
        )
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise DevServicesError("formatting the Kafka storage took over 2 minutes") from exc
        if result.returncode != 0:
            output = (result.stderr + result.stdout).strip()[-4000:]
            raise DevServicesError(f"formatting the Kafka storage failed:\n{output}")

    def _scram_arguments(self) -> list[str]:
        """SCRAM credentials written into the metadata log at format time (KRaft has no
        ZooKeeper to add them to later)."""
        args: list[str] = []
        for name, password in self.scram_users.items():
            if any(c in name + password for c in ",=[]\"'"):
                raise DevServicesError("SCRAM test users need names/passwords without ,=[]\"'")
            args += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"]
        return args

    def _launch(self, java: str, lib: Path) -> None:
        command = self._java_command(
            java, lib, *HEAP, "-XX:+ExitOnOutOfMemoryError", "kafka.Kafka", str(self.config_path)
        )
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )

    def _wait_ready(self, deadline: float) -> None:
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                log_tail = tail(self.log_path)
                if "Address already in use" in log_tail:
                    raise _PortTaken
                raise DevServicesError(
                    f"the Kafka broker exited with code {self.process.returncode}:\n{log_tail}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevServicesError(
                    f"the Kafka broker served no metadata within {self.start_timeout_s:.0f}s "
                    f"on 127.0.0.1:{self.port}:\n{tail(self.log_path)}"
                )
            # A plain connect first: the Kafka client logs errors for every refused attempt.
            if _accepts_tcp(self.port) and _serves_metadata(
                f"127.0.0.1:{self.port}", timeout_s=min(remaining, 5.0)
            ):
                return
            time.sleep(0.1)

    def prepare(self) -> None:
        """A cluster node's first step: its directory and formatted storage, not yet started."""
        if self.root is not None:
            raise DevServicesError("the Kafka broker is already started")
        self.root = Path(tempfile.mkdtemp(prefix=f"relay-kafka-{self.node_id}-"))
        track(self, self.stop)
        self._format(find_java(), broker_jars())

    def launch(self) -> None:
        """Start the JVM on the prepared (or previously used) storage; returns at once."""
        if self.running:
            raise DevServicesError("the Kafka broker is already running")
        self._launch(find_java(), broker_jars())

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Return once the broker serves metadata (in a cluster: once the quorum has formed)."""
        try:
            self._wait_ready(time.monotonic() + (timeout_s or self.start_timeout_s))
        except _PortTaken:
            raise DevServicesError(
                f"the Kafka broker could not bind its ports:\n{tail(self.log_path)}"
            ) from None

    def restart(self, *, crash: bool = False) -> None:
        """Stop the broker (SIGTERM, or SIGKILL with ``crash``) and start it again on the same
        storage; returns once it serves metadata again."""
        if crash:
            self.kill()
            self.process = None
        else:
            self._terminate()
        self.launch()
        self.wait_ready()

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its sockets open and answers nothing (an ambiguous peer).

        Returns once every thread of the broker is stopped: kill() only queues the signal, and a
        broker thread running on the other core could still answer a request sent right after.
        """
        os.killpg(self.pid, signal.SIGSTOP)
        _wait_group_stopped(self.pid)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, like a crash; the directory (and its log) stays until :meth:`stop`."""
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after 20 s, then delete the directory. Idempotent."""
        try:
            self._terminate()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
            untrack(self)

    def _terminate(self, grace_s: float = 20.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            # SIGCONT first: a paused broker would not act on SIGTERM until resumed.
            _signal_group(process.pid, signal.SIGCONT)
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("the Kafka broker ignored SIGTERM for %.0fs; killing it", grace_s)
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        self.process = None


class KafkaCluster:
    """Several combined broker+controller nodes (KRaft) forming one cluster on loopback, from the
    same cached jars as :class:`LocalKafka`: topics replicated ``replication`` times (three nodes:
    replication factor 3, ``min.insync.replicas`` 2), for tests that kill, pause or restart one
    node while the others carry on. ``extra_properties`` go to every node."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        partitions: int = 3,
        replication: int | None = None,
        extra_properties: Mapping[str, str | int | bool] | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        if nodes < 1:
            raise DevServicesError("a Kafka cluster needs at least one node")
        ports = free_ports(2 * nodes)
        voters = ",".join(f"{i + 1}@127.0.0.1:{ports[nodes + i]}" for i in range(nodes))
        cluster_id = new_cluster_id()
        self.nodes = [
            LocalKafka(
                partitions=partitions,
                port=ports[i],
                controller_port=ports[nodes + i],
                node_id=i + 1,
                voters=voters,
                cluster_id=cluster_id,
                replication=replication if replication is not None else min(nodes, 3),
                extra_properties=extra_properties,
                start_timeout_s=start_timeout_s,
            )
            for i in range(nodes)
        ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def node(self, node_id: int) -> LocalKafka:
        """The node with this broker id (1-based, as Kafka's metadata names it)."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise DevServicesError(f"no node {node_id} in this cluster")

    def start(self) -> None:
        """Format every node, start them all (no node is ready before a quorum is), wait."""
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
                list(pool.map(lambda node: node.prepare(), self.nodes))
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info(
            "Kafka cluster of %d nodes ready on %s in %.1fs",
            len(self.nodes),
            self.bootstrap_servers,
            time.monotonic() - started,
        )

    def stop(self) -> None:
        """Stop every node (in parallel: a node alone may wait for its peers) and delete them."""
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(), self.nodes))


class _PortTaken(Exception):
    """The broker lost the race for a port picked a moment earlier."""


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group_stopped(pgid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _group_stopped(pgid):
        if time.monotonic() > deadline:
            raise DevServicesError(f"process group {pgid} did not stop within {timeout_s:.0f} s")
        time.sleep(0.005)


def _group_stopped(pgid: int) -> bool:
    """True when every thread of every live process in the group is stopped (state T)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if _stat_fields(proc / "stat")[2] != str(pgid):
                continue
            for task in (proc / "task").iterdir():
                if _stat_fields(task / "stat")[0] not in ("T", "t", "Z", "X"):
                    return False
        except (OSError, IndexError):
            continue  # the process or thread ended meanwhile
    return True


def _stat_fields(path: Path) -> list[str]:
    """The fields after a /proc stat line's command name (which may hold spaces)."""
    return path.read_text().rsplit(")", 1)[1].split()


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _serves_metadata(bootstrap: str, timeout_s: float) -> bool:
    """True once the broker answers a metadata request listing itself.

    Bootstrapping an admin client does exactly that, against the given address only, so it works
    when ``advertised.listeners`` points at a proxy that is not up yet.
    """
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    timeout_ms = max(int(timeout_s * 1000), 100)
    try:
        client = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="relay-devservices-probe",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
            reconnect_backoff_ms=100,
            reconnect_backoff_max_ms=500,
        )
    except (KafkaError, OSError):
        return False
    client.close()
    return True
