"""A real single-node Apache Kafka broker (KRaft) from the official jars on Maven Central.

Maven resolves the broker and its runtime dependencies from the small pom kept beside this file;
the jars are copied once into a cache, so a second start makes no Maven call at all.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from importlib import resources
from pathlib import Path

from relay.devservices.common import (
    DevServicesError,
    cache_dir,
    free_port,
    on_exit,
    require_tool,
    tail,
)

log = logging.getLogger(__name__)
KAFKA_VERSION = "4.1.1"


def _resource(name: str) -> Path:
    return Path(str(resources.files(__package__).joinpath(name)))


def broker_jars() -> Path:
    """The cached jar directory, resolving it with Maven on first use (under a file lock)."""
    root = cache_dir() / f"kafka-{KAFKA_VERSION}"
    lib, marker = root / "lib", root / "complete"
    if marker.is_file():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            return lib
        mvn = require_tool("mvn", "install Maven to fetch the Kafka broker from Maven Central")
        shutil.rmtree(lib, ignore_errors=True)
        log.info("resolving Apache Kafka %s with Maven into %s", KAFKA_VERSION, lib)
        result = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(_resource("kafka-pom.xml")),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={lib}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DevServicesError(
                f"Maven could not resolve Kafka {KAFKA_VERSION}:\n{result.stdout[-3000:]}"
            )
        marker.write_text(KAFKA_VERSION)
    return lib


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return require_tool("java", "install a Java 17+ runtime to run the Kafka broker")


class LocalKafka:
    """One broker process in a temporary directory; ``pause()`` freezes it for fault tests."""

    def __init__(
        self,
        *,
        partitions: int = 3,
        auto_create_topics: bool = True,
        advertised: str | None = None,
        port: int | None = None,
        extra_properties: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.controller_port = free_port()
        self.partitions = partitions
        self.auto_create_topics = auto_create_topics
        self.advertised = advertised or f"127.0.0.1:{self.port}"
        self.extra = dict(extra_properties or {})
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return self.advertised

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "broker.log"

    def properties(self, log_dir: Path) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.advertised}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(log_dir),
            "num.partitions": str(self.partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "3",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true" if self.auto_create_topics else "false",
            **self.extra,
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def start(self, timeout_s: float = 60.0) -> None:
        lib = broker_jars()
        java = _java()
        self.root = Path(tempfile.mkdtemp(prefix="relay-kafka-"))
        config = self.root / "server.properties"
        config.write_text(self.properties(self.root / "data"))
        classpath = f"{lib}/*"
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run(
            [
                java,
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(config),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise DevServicesError(f"formatting Kafka storage failed: {fmt.stderr or fmt.stdout}")
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [
                    java,
                    "-Xms256m",
                    "-Xmx768m",
                    "-XX:+UseG1GC",
                    "-cp",
                    classpath,
                    f"-Dlog4j2.configurationFile={_resource('log4j2.properties')}",
                    "kafka.Kafka",
                    str(config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        on_exit(self.stop)
        self._wait_ready(timeout_s)
        log.info("Kafka %s ready on %s", KAFKA_VERSION, self.bootstrap_servers)

    def _wait_ready(self, timeout_s: float) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise DevServicesError(f"the Kafka broker exited:\n{tail(self.log_path)}")
            try:
                consumer = KafkaConsumer(
                    bootstrap_servers=f"127.0.0.1:{self.port}", request_timeout_ms=5000
                )
                try:
                    consumer.topics()
                    return
                finally:
                    consumer.close()
            except KafkaError:
                time.sleep(0.3)
        self.stop()
        raise DevServicesError(f"the Kafka broker was not ready in {timeout_s:.0f}s")

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its sockets open and answers nothing (an ambiguous peer)."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGCONT)
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        self.process = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
