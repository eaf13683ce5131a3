"""The embedded local stack on 127.0.0.1: SeaweedFS S3, an MLflow tracking server, a Prefect server, a
Prefect worker polling the ``process`` work pool that ``headbench deploy`` targets, with
``--ray-nodes N`` a Ray cluster of a head and N-1 worker nodes that every run trains on, and with
``--backend postgres`` (no ``--database-url``) a PostgreSQL server holding MLflow's and Prefect's stores
(``infra.stack.postgres``).

All state lives under one directory (``$HEADBENCH_HOME``, default ``.headbench/``): data, logs, pid files,
``stack.json`` (ports and the generated S3 keys, mode 0600) and ``env`` (sourceable ``export`` lines with
the standard variables). Every service runs in its own process group, so ``down`` stops exactly the
process trees ``up`` started, by pid, and nothing else on the machine.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shlex
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from infra.processes.supervise import BIN, HOST, free_port, pid_alive
from infra.settings import Settings, StackPorts
from infra.stack import postgres
from infra.stack.ray_nodes import (
    DRIVER_RESOURCE,
    NODE_ENV,
    PortPicker,
    RayCluster,
    alive_node_resources,
    alive_nodes,
    driver_node_argv,
    head_argv,
    node_argv,
)
from infra.stack.seaweedfs import JWT_SECTIONS, ensure_grpc_certificates, security_toml
from infra.stack.services import ServiceSpec, ServiceStatus, StackError, Supervisor, http_ok
from infra.uris import redact_url

BACKENDS = ("sqlite", "postgres")
# the StackPorts fields each service listens on
SERVICE_PORTS = {"postgres": ["postgres"],
                 "s3": [f for f in StackPorts.model_fields if f.startswith(("s3", "weed"))], "mlflow": ["mlflow"],
                 "prefect": ["prefect"], "worker": ["prefect_worker"], "ray-head": ["ray_gcs", "ray_dashboard"]}
MAX_RAY_NODES = 16  # one host: each node is a raylet, an object store and agents (~0.3 GB each)
MAX_NODE_CPUS = 1024
MLFLOW_ADMIN = "admin"  # the MLflow UI's login name (MLFLOW_TRACKING_USERNAME)


def free_ports() -> StackPorts:
    """Every stack port free, for a second stack beside the default one (tests, the benchmark)."""
    return StackPorts(**{name: free_port() for name in StackPorts.model_fields})


def parse_node_cpus(value: int | str | list[int] | None, nodes: int) -> list[int] | None:
    """``--ray-cpus``: one count for every node (``2``) or one per node, head first (``2,1``); None = even share.
    Returns one count per node, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        counts = [value]
    elif isinstance(value, list):
        counts = value
    else:
        try:
            counts = [int(part) for part in value.split(",")]
        except ValueError:
            raise StackError(f"--ray-cpus {value[:40]!r} is not a CPU count or a comma list of them; "
                             "e.g. 2 or 2,1 (head first)") from None
    if not all(1 <= c <= MAX_NODE_CPUS for c in counts):
        raise StackError(f"--ray-cpus {','.join(map(str, counts))} is out of range; allowed: 1 to "
                         f"{MAX_NODE_CPUS} CPUs per node")
    if len(counts) == 1:
        return counts * max(1, nodes)
    if len(counts) != nodes:
        raise StackError(f"--ray-cpus {','.join(map(str, counts))} names {len(counts)} nodes but --ray-nodes is "
                         f"{nodes}; give one count, or one per node")
    return counts


class LocalStack(Supervisor):
    """Start, inspect and stop the local stack rooted at ``settings.home``."""

    def __init__(self, settings: Settings, ports: StackPorts | None = None, backend: str | None = None,
                 database_url: str | None = None, ray_nodes: int | None = None,
                 ray_cpus: int | str | list[int] | None = None) -> None:
        self.home = settings.home.resolve()
        self.settings = settings
        saved = self._read_state()
        # a saved stack keeps its ports, except one named by its HEADBENCH_PORT_* variable (what the busy-port
        # error tells the user to set)
        self.ports = ports or (StackPorts(**(saved["ports"] | settings.ports.model_dump(exclude_unset=True)))
                               if saved else settings.ports)
        self.access_key = saved.get("access_key") if saved else None
        self.secret_key = saved.get("secret_key") if saved else None
        self.prefect_auth = saved.get("prefect_auth") if saved else None  # the Prefect API's basic-auth string
        # MLflow's admin password and its Flask secret (CSRF), Ray's token, SeaweedFS's JWT signing keys: made by
        # the first `up`, kept in the 0600 state file, handed to clients by environment only
        self.mlflow_password: str | None = saved.get("mlflow_password")
        self.mlflow_flask_key: str | None = saved.get("mlflow_flask_key")
        self.ray_token: str | None = saved.get("ray_token")
        self.jwt_keys: dict[str, str] = saved.get("jwt_keys") or {}
        self.ray_tmp: list[str] = saved.get("ray_tmp") or []  # mkdtemp's folders for Ray (ray_temp_dirs)
        # sqlite (default, files under $HEADBENCH_HOME) or postgres: the choice sticks to the stack's state
        self.backend = backend or saved.get("backend", "sqlite")
        # argv is world-readable (ps): the URL, which may hold a password, can come from the environment
        url_from_env = settings.database_url.get_secret_value() if settings.database_url else None
        # an external server's URL; none with --backend postgres: the stack runs its own (infra.stack.postgres)
        self.external_database_url: str | None = database_url or saved.get("database_url") or url_from_env
        self.pg_password: str | None = saved.get("pg_password")  # the own server's login, made by `up`
        if self.backend not in BACKENDS:
            raise StackError(f"unknown --backend {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        if self.backend == "postgres" and self.external_database_url:
            postgres.check_database_url(self.external_database_url)
        # 0: no cluster, each run starts a private Ray; N >= 1: a head and N-1 worker nodes, RAY_ADDRESS set
        self.ray_nodes = saved.get("ray_nodes", 0) if ray_nodes is None else ray_nodes
        if not 0 <= self.ray_nodes <= MAX_RAY_NODES:
            raise StackError(f"--ray-nodes {self.ray_nodes} is out of range; allowed: 0 (a private Ray per run) "
                             f"to {MAX_RAY_NODES}")
        # one CPU count per node, or None: the machine's CPUs shared evenly
        # the saved per-node counts belong to the saved cluster shape: another --ray-nodes starts from even shares
        same_shape = ray_nodes is None or ray_nodes == saved.get("ray_nodes", 0)
        self.ray_cpus_option = parse_node_cpus(ray_cpus if ray_cpus is not None else
                                               saved.get("ray_cpus") if same_shape else None, self.ray_nodes)
        even = max(1, (os.cpu_count() or 1) // max(1, self.ray_nodes))
        self.ray_node_cpus = self.ray_cpus_option or [even] * max(1, self.ray_nodes)

    # ------------------------------------------------------------------ state files
    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.home / "env"

    def _read_state(self) -> dict:
        try:
            return json.loads((self.home / "stack.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    # ------------------------------------------------------------------ endpoints
    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.ports.s3}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports.mlflow}"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.ports.prefect}"

    @property
    def ray_gcs_address(self) -> str:
        return f"{HOST}:{self.ports.ray_gcs}"

    @property
    def ray_address(self) -> str | None:
        """The GCS of this stack's Ray cluster (None without --ray-nodes)."""
        return self.ray_gcs_address if self.ray_nodes else None

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ports.ray_dashboard}"

    def ray_cluster(self) -> RayCluster | None:
        """This stack's Ray cluster as clients see it (None without --ray-nodes)."""
        if not self.ray_address:
            return None
        pids = [self._pid(spec.name) for spec in self.ray_services()]
        return RayCluster(self.ray_address, self.ray_dashboard_url, tuple(p for p in pids if p is not None),
                          self.ray_token)

    def secrets(self) -> list[str]:
        """Every credential this stack generated (what must never be recorded outside its 0600 files)."""
        return [s for s in (self.access_key, self.secret_key, self.prefect_auth, self.mlflow_password,
                            self.mlflow_flask_key, self.ray_token, self.pg_password, *self.jwt_keys.values()) if s]

    def _generate_secrets(self) -> None:
        """The credentials a stack needs, made once (an existing stack keeps its own)."""
        if not self.access_key or not self.secret_key:
            self.access_key, self.secret_key = "hb" + secrets.token_hex(8), secrets.token_urlsafe(24)
        if not self.prefect_auth:  # `user:password`, what the UI's login box takes
            self.prefect_auth = f"headbench:{secrets.token_urlsafe(24)}"
        self.mlflow_password = self.mlflow_password or secrets.token_urlsafe(24)
        self.mlflow_flask_key = self.mlflow_flask_key or secrets.token_hex(32)
        self.ray_token = self.ray_token or secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
        self.jwt_keys = {name: self.jwt_keys.get(name) or secrets.token_urlsafe(32) for name in JWT_SECTIONS}
        if self.own_postgres:
            self.pg_password = self.pg_password or secrets.token_urlsafe(24)

    def credential_env(self) -> dict[str, str]:
        """The logins every client of this stack needs besides the S3 keys: MLflow's and Ray's (standard
        variables)."""
        return ({"MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN, "MLFLOW_TRACKING_PASSWORD": self.mlflow_password}
                if self.mlflow_password else {}) | (
               {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.ray_token} if self.ray_token else {})

    def standard_env(self) -> dict[str, str]:
        """What the env file exports: the standard variable of each tool, pointing at this stack."""
        assert self.access_key and self.secret_key
        ray = {"RAY_ADDRESS": self.ray_address, "HEADBENCH_RAY_TEMP_DIR": str(self.ray_temp_dirs[1])} \
            if self.ray_address else {}
        return ray | self.credential_env() | {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.settings.aws_region,
            "PREFECT_API_URL": f"{self.prefect_url}/api",
        } | ({"PREFECT_API_AUTH_STRING": self.prefect_auth} if self.prefect_auth else {})

    # ------------------------------------------------------------------ services
    def _s3_healthy(self) -> bool:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name=self.settings.aws_region,
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3))
        try:
            client.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False

    # ------------------------------------------------------------------ backend stores
    @property
    def own_postgres(self) -> bool:
        """--backend postgres with no external server named: the stack runs PostgreSQL itself."""
        return self.backend == "postgres" and not self.external_database_url

    @property
    def database_url(self) -> str | None:
        """The PostgreSQL server of the stores: the external one, or the stack's own; None for sqlite."""
        if self.own_postgres:
            return postgres.server_url(self.ports.postgres, self.pg_password)
        return self.external_database_url if self.backend == "postgres" else None

    def database(self, service: str, name: str | None = None) -> str:
        """postgresql://.../<name>?<query> -> the URL of database ``<name>_<service>`` (one per server), its
        query string (``sslmode=...``) kept; ``name`` replaces the database name (the maintenance db)."""
        assert self.database_url
        url = urlsplit(self.database_url)
        base = postgres.database_name(self.database_url)
        # postgres:// is libpq's alias, which SQLAlchemy (MLflow's store) does not take
        return urlunsplit(url._replace(scheme="postgresql", path=f"/{name or f'{base}_{service}'}"))

    @property
    def mlflow_store(self) -> str:
        if self.backend == "postgres":
            return self.database("mlflow")
        return f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"

    @property
    def prefect_store(self) -> str:
        # SQLAlchemy's asyncpg dialect takes libpq's sslmode values under the name `ssl`
        url = urlsplit(self.database("prefect"))
        query = urlencode([("ssl" if k == "sslmode" else k, v) for k, v in parse_qsl(url.query)])
        return urlunsplit(url._replace(scheme="postgresql+asyncpg", query=query))

    def _create_databases(self) -> None:
        """CREATE DATABASE for MLflow's and Prefect's stores when missing."""
        postgres.create_databases(self.database("", name="postgres"),
                                  [postgres.database_name(self.database(service)) for service in ("mlflow", "prefect")])

    def worker_env(self) -> dict[str, str]:
        """The worker's environment, inherited by every flow run it starts: the stack's standard variables
        and HEADBENCH_HOME, so deployed runs resolve the same settings as `headbench run`."""
        env = self.standard_env() | {
            "HEADBENCH_HOME": str(self.home), "HEADBENCH_WORK_POOL": self.settings.work_pool,
            "PREFECT_HOME": str(self.home / "prefect"), "PREFECT_WORKER_WEBSERVER_HOST": HOST,
            "PREFECT_WORKER_WEBSERVER_PORT": str(self.ports.prefect_worker),
            # a run started from the dashboard starts within this long (Prefect's default polls every 10 s);
            # every poll is work for the Prefect server, beside any training (docs/performance.md)
            "PREFECT_WORKER_QUERY_SECONDS": f"{self.settings.worker_query_seconds:g}", "DO_NOT_TRACK": "1"}
        foreign = self.settings.ray_address
        if not self.ray_nodes and foreign and foreign != self.ray_gcs_address:  # not a stale own address
            env["RAY_ADDRESS"] = foreign  # a Ray cluster named when the stack came up is where runs train
        return env

    @property
    def ray_temp_dirs(self) -> tuple[Path, Path]:
        """Temp dirs of the cluster's nodes and of its driver node. Ray's unix sockets live under them, and a
        socket path must stay under 108 bytes: under a long $HEADBENCH_HOME they are ``n`` and ``d`` in a private
        folder that ``mkdtemp`` made under the system's temp dir (never a name another user could guess and
        create first), remembered in the state file. Ray makes its temp dir 0777: the 0700 folder above it keeps
        every other user out, as $HEADBENCH_HOME does for the short-home case."""
        base = self.home / "ray"
        if len(str(base)) <= 44:
            return base, base.with_name(base.name + "-d")
        if not self.ray_tmp:  # not made yet (`up` makes them): names no one creates, for argv shown before that
            unmade = Path(tempfile.gettempdir()) / "hbray-not-made-yet"
            return unmade, unmade.with_name(unmade.name + "-d")
        return Path(self.ray_tmp[0]), Path(self.ray_tmp[1])

    def _make_ray_temp_dirs(self) -> None:
        """The long-home case of ``ray_temp_dirs``: one ``mkdtemp`` folder, made once per `up` after a `down`
        (the state keeps it meanwhile; a remembered folder that is gone is never made again under its old,
        known name); Ray makes ``n`` and ``d`` in it."""
        if len(str(self.home / "ray")) > 44 and not (self.ray_tmp and Path(self.ray_tmp[0]).parent.is_dir()):
            private = Path(tempfile.mkdtemp(prefix="hbray-"))  # 0700
            self.ray_tmp = [str(private / "n"), str(private / "d")]

    def _remove_ray_temp_dirs(self) -> None:
        """`down`: the long-home case's folder goes with the nodes that used it (their sessions' sockets, logs
        and spilled objects); the folder under $HEADBENCH_HOME stays with the rest of the stack's state."""
        if self.ray_tmp:
            shutil.rmtree(Path(self.ray_tmp[0]).parent, ignore_errors=True)

    def ray_services(self) -> list[ServiceSpec]:
        """The Ray head, its worker nodes and the 0-CPU driver node (``infra.stack.ray_nodes``), every port picked
        clear of the stack's."""
        if not self.ray_nodes:
            return []
        picker = PortPicker(set(self.ports.all().values()))
        dashboard = self.ray_dashboard_url
        temp_dir, driver_temp_dir = self.ray_temp_dirs
        # S3 credentials reach Ray's workers through their environment, inherited from the node: Ray's
        # checkpoint filesystem is pickled without them (infra.storage.checkpoints.ray_storage). RAY_ADDRESS:
        # Ray's own code in the workers (Train's placement-group cleaner) asks the state API of the cluster it
        # names, else of the host's last `ray start` with the default temp dir
        # (infra.training.cluster.own_address_env)
        # MLflow's login: Train's controller logs each epoch to the run; Ray's token: every node and client
        env = NODE_ENV | self.credential_env() | {
            "AWS_ACCESS_KEY_ID": self.access_key or "", "AWS_SECRET_ACCESS_KEY": self.secret_key or "",
            "AWS_DEFAULT_REGION": self.settings.aws_region, "RAY_ADDRESS": self.ray_gcs_address}
        token = self.ray_token
        specs = [ServiceSpec("ray-head", head_argv(self.ports.ray_gcs, self.ports.ray_dashboard, self.ray_node_cpus[0],
                                                   temp_dir, picker),
                             dict(env), lambda: 0 in alive_nodes(dashboard, token=token), dashboard, "--head",
                             leader_first=True, ports=self._ports("ray-head"))]
        for index in range(1, self.ray_nodes):
            argv = node_argv(self.ray_gcs_address, index, self.ray_node_cpus[index], picker)
            specs.append(ServiceSpec(f"ray-node-{index}", argv,
                                     dict(env), functools.partial(lambda i: i in alive_nodes(dashboard, token=token),
                                                                           index),
                                     dashboard, "infra.stack.ray_nodes", leader_first=True, after=("ray-head",)))
        specs.append(ServiceSpec("ray-driver", driver_node_argv(self.ray_gcs_address, driver_temp_dir, picker),
                                 dict(env), lambda: DRIVER_RESOURCE in alive_node_resources(dashboard, token=token),
                                 dashboard, "infra.stack.ray_nodes", leader_first=True, after=("ray-head",)))
        return specs

    def postgres_services(self) -> list[ServiceSpec]:
        """The stack's own PostgreSQL, when it runs one: healthy once it takes the stack's login; the stores'
        databases are created then, before MLflow and Prefect start. Stopped last, by SIGINT (fast shutdown)."""
        if not self.own_postgres:
            return []
        maintenance = self.database("", name="postgres")
        return [ServiceSpec("postgres", postgres.server_argv(postgres.data_dir(self.home), self.ports.postgres), {},
                            functools.partial(postgres.accepts_logins, maintenance),
                            redact_url(self.database_url or ""), "postgres", leader_first=True,
                            leader_signal=signal.SIGINT, prepare=self._create_databases, ports=self._ports("postgres"))]

    def _ports(self, service: str) -> dict[str, int]:
        """The ports a service listens on, by their setting (HEADBENCH_PORT_<NAME>)."""
        return {name: getattr(self.ports, name) for name in SERVICE_PORTS.get(service, [])}

    def services(self) -> list[ServiceSpec]:
        p, home = self.ports, self.home
        keys = {"AWS_ACCESS_KEY_ID": self.access_key or "", "AWS_SECRET_ACCESS_KEY": self.secret_key or ""}
        # The S3 gateway, with its keys, is the way in: no master or filer HTTP API (-disableHttp), no admin UI;
        # the volume servers and the filer refuse requests without a JWT signed with the stack's keys, and every
        # gRPC port a client without the stack's certificate (security.toml in the working directory, written
        # by `up`: infra.stack.seaweedfs; docs/reliability.md)
        weed = [
            str(BIN / "weed"), "mini", f"-dir={home / 's3'}", f"-ip={HOST}", f"-ip.bind={HOST}", "-disableHttp",
            "-admin.ui=false", "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}",
            f"-master.port={p.weed_master}", f"-master.port.grpc={p.weed_master_grpc}",
            f"-volume.port={p.weed_volume}", f"-volume.port.grpc={p.weed_volume_grpc}",
            f"-filer.port={p.weed_filer}", f"-filer.port.grpc={p.weed_filer_grpc}",
            f"-admin.port={p.weed_admin}", f"-admin.port.grpc={p.weed_admin_grpc}",
            "-filer.localSocket=" + str(home / "s3" / "filer.sock"),
            "-s3.localSocket=" + str(home / "s3" / "s3.sock"),
        ]
        mlflow = [
            str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(p.mlflow), "--workers", "1",
            "--artifacts-destination", f"s3://{self.settings.mlflow_bucket}", "--app-name", "basic-auth",
        ]  # the backend store URI goes by environment: it may hold a password, argv is world-readable
        prefect = [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(p.prefect),
                   "--analytics-off"]
        # `--type process` creates the pool if it is missing. Each flow run is a child of the worker in a
        # session of its own, which `down` (worker first) SIGTERMs before the worker: an interrupted worker
        # SIGKILLs its flow runs, which would leave their MLflow and Prefect runs RUNNING.
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", self.settings.work_pool, "--type", "process",
                  "--name", f"headbench-{p.prefect}", "--with-healthcheck"]
        ray = self.ray_services()
        stores = self.postgres_services()
        store_after = tuple(spec.name for spec in stores)
        return [
            *stores,
            ServiceSpec("s3", weed, keys, self._s3_healthy, self.s3_url, "weed", prepare=self._create_buckets,
                        ports=self._ports("s3")),
            ServiceSpec("mlflow", mlflow,
                        {**keys, "MLFLOW_S3_ENDPOINT_URL": self.s3_url, "MLFLOW_BACKEND_STORE_URI": self.mlflow_store,
                         "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "AWS_DEFAULT_REGION": "us-east-1",
                         # every request but /health needs the login; the admin is created with this password
                         # on the first start (MLflow has no default one) and the auth store lives beside ours
                         "MLFLOW_AUTH_CONFIG_PATH": str(self.mlflow_auth_config),
                         "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN,
                         "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_password or "",
                         "MLFLOW_FLASK_SERVER_SECRET_KEY": self.mlflow_flask_key or ""},
                        lambda: http_ok(f"{self.mlflow_url}/health"), self.mlflow_url, "mlflow", after=store_after,
                        ports=self._ports("mlflow")),
            ServiceSpec("prefect", prefect,
                        {"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                         **({"PREFECT_SERVER_DATABASE_CONNECTION_URL": self.prefect_store}
                            if self.backend == "postgres" else {}),
                         "DO_NOT_TRACK": "1", "PREFECT_SERVER_API_HOST": HOST,
                         # every API request but the health probe needs the auth string (a process work pool
                         # runs whatever command a flow run carries); state changes need a CSRF token, and
                         # only the UI's own origin may call the API from a browser
                         **({"PREFECT_SERVER_API_AUTH_STRING": self.prefect_auth,
                             "PREFECT_API_AUTH_STRING": self.prefect_auth} if self.prefect_auth else {}),
                         "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
                         "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": self.prefect_url},
                        lambda: http_ok(f"{self.prefect_url}/api/health"), self.prefect_url, "prefect",
                        after=store_after, ports=self._ports("prefect")),
            *ray,
            # last: a flow run it picks up finds the servers and the whole Ray cluster there
            ServiceSpec("worker", worker, self.worker_env() if self.access_key else {},
                        lambda: http_ok(f"http://{HOST}:{p.prefect_worker}/health"),
                        f"{self.prefect_url}/work-pools/work-pool/{self.settings.work_pool}", "worker",
                        child_groups_first=True, after=("s3", "mlflow", "prefect", *(r.name for r in ray)),
                        ports=self._ports("worker")),
        ]

    @property
    def mlflow_auth_config(self) -> Path:
        return self.home / "mlflow" / "basic_auth.ini"

    def _write_service_configs(self) -> None:
        """MLflow's auth config (no secret in it: the password goes by environment) and SeaweedFS's
        security.toml (JWT keys, gRPC certificates: ``infra.stack.seaweedfs``), all 0600."""
        self._write_private(self.mlflow_auth_config, "[mlflow]\ndefault_permission = READ\n"
                            f"database_uri = sqlite:///{self.home / 'mlflow' / 'basic_auth.db'}\n"
                            f"admin_username = {MLFLOW_ADMIN}\n"
                            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                            # a checked login is remembered for 10 minutes: each check is a deliberately slow
                            # password hash, and a run makes hundreds of requests (one server worker, so no
                            # other worker keeps a stale entry)
                            "auth_cache_ttl_seconds = 600\n")
        self._private_dirs()
        certificates = ensure_grpc_certificates(self.home / "s3" / "tls")
        self._write_private(self.home / "security.toml", security_toml(self.jwt_keys, *certificates))

    def up(self, timeout: float = 180.0, on_ready: Callable[[str, str, bool], None] | None = None) -> None:
        """Start what is not running (idempotent), wait for health, create buckets, write the env file."""
        self._generate_secrets()
        if self.ray_nodes:
            self._make_ray_temp_dirs()  # before the state is written: it keeps them
        saved = self._read_state()
        if saved and (saved.get("ray_nodes", 0), saved.get("ray_cpus")) != (self.ray_nodes, self.ray_cpus_option):
            # another cluster shape: stop the old Ray nodes, and the worker whose runs train on them
            previous = LocalStack(self.settings, self.ports)
            self._stop([s for s in previous.services() if s.name.startswith("ray-") or s.name == "worker"])
        self._write_private(self.state_file, json.dumps(
            {"ports": self.ports.all(), "access_key": self.access_key, "secret_key": self.secret_key,
             "prefect_auth": self.prefect_auth, "mlflow_password": self.mlflow_password,
             "mlflow_flask_key": self.mlflow_flask_key, "ray_token": self.ray_token, "jwt_keys": self.jwt_keys,
             "ray_tmp": self.ray_tmp,
             "backend": self.backend, "database_url": self.external_database_url, "pg_password": self.pg_password,
             "ray_nodes": self.ray_nodes, "ray_cpus": self.ray_cpus_option}, indent=2))
        self._write_service_configs()
        if self.own_postgres:
            postgres.init_cluster(postgres.data_dir(self.home), self.pg_password or "")
        elif self.backend == "postgres":
            self._create_databases()
        self._start_all(self.services(), timeout, on_ready)
        self._write_private(self.env_file, "".join(
            f"export {k}={shlex.quote(v)}\n" for k, v in self.standard_env().items()))

    def _create_buckets(self) -> None:
        from pydantic import SecretStr

        from infra.storage.s3 import ensure_buckets, s3_client

        settings = self.settings.model_copy(update={
            "s3_endpoint_url": self.s3_url, "aws_access_key_id": SecretStr(self.access_key or ""),
            "aws_secret_access_key": SecretStr(self.secret_key or "")})
        s = self.settings
        ensure_buckets(s3_client(settings), [s.mlflow_bucket, s.model_bucket, s.data_bucket,
                                             s.checkpoint_bucket], self.s3_url)

    def status(self) -> list[ServiceStatus]:
        out = []
        for spec in self.services():
            pid = self._pid(spec.name)
            running = pid is not None and pid_alive(pid, spec.marker)
            out.append(ServiceStatus(spec.name, pid, running, running and spec.health(), spec.url))
        return out

    def down(self, timeout: float = 20.0) -> list[str]:
        """Stop, in reverse start order, the process groups this stack started. Returns what was stopped."""
        stopped = self._stop(self.services(), timeout)
        self._remove_ray_temp_dirs()
        return stopped

