"""Settings shared by every environment; everything that differs is read from the environment here."""
from datetime import timedelta
from pathlib import Path

import environ
import orjson

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
# A local .env is a convenience for developers; real deployments set the environment.
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env("SECRET_KEY", default="")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'deepopt.sqlite3'}"),
}
# Persistent connections: a request that opens a fresh PostgreSQL connection pays ~2 ms for it.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("CONN_HEALTH_CHECKS", default=True)
# ASGI servers run Django's sync code on threads they do not keep, so per-thread persistent connections
# pile up until PostgreSQL refuses more: DATABASE_POOL=N gives each process a pool of N instead.
DATABASE_POOL = env.int("DATABASE_POOL", default=0)


def use_prepared_statements(databases: dict) -> None:
    """Send parameters apart from the SQL, so that psycopg prepares the statements a connection runs
    often and PostgreSQL stops parsing and planning them anew: a third of its CPU per job submission."""
    if databases["default"]["ENGINE"] == "django.db.backends.postgresql":
        databases["default"].setdefault("OPTIONS", {}).update({"server_side_binding": True, "prepare_threshold": 5})


if env.bool("DATABASE_SERVER_SIDE_BINDING", default=False):
    use_prepared_statements(DATABASES)
if DATABASE_POOL and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {"min_size": 1, "max_size": DATABASE_POOL, "timeout": 10}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web server, the worker and beat read while one of them writes.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;", "timeout": 20,
         "transaction_mode": "IMMEDIATE"}
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", default="redis://127.0.0.1:6379/0")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "axes",
    "apps.accounts",
    "apps.cluster",
    "apps.scheduling",
    "apps.forecasting",
    "apps.dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: turns a sign-in that django-axes refused into the lockout answer (apps/accounts/lockout.py).
    "axes.middleware.AxesMiddleware",
]

# Sign-in throttling (django-axes): after DEEPOPT_LOGIN_FAILURE_LIMIT failed sign-ins for one username
# from one address, that pair is refused for DEEPOPT_LOGIN_COOLOFF_MINUTES, even with the right
# password; a success clears its count. It guards every password check: the login page, the admin's
# and POST /api/v1/auth/token/. By username and address together, so that nobody can lock a user
# out from elsewhere. The address is the connection's (REMOTE_ADDR): behind a reverse proxy every
# sign-in comes from the proxy, and the count is in effect per username.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("DEEPOPT_LOGIN_FAILURE_LIMIT", default=10)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("DEEPOPT_LOGIN_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "apps.accounts.lockout.lockout_response"
AXES_VERBOSE = False

ROOT_URLCONF = "deepopt_web.urls"
WSGI_APPLICATION = "deepopt_web.wsgi.application"
ASGI_APPLICATION = "deepopt_web.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env("STATIC_ROOT", default=str(VAR_DIR / "staticfiles")))
STATICFILES_DIRS = [BASE_DIR / "static"]
# plotly.js comes from the installed plotly package (the version requirements.txt pins), not a CDN.
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "deepopt_web.staticfinders.PlotlyFinder",
]
MEDIA_URL = "media/"
MEDIA_ROOT = env.path("MEDIA_ROOT", default=str(VAR_DIR / "media"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.accounts.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "apps.accounts.api.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_RENDERER_CLASSES": [
        # orjson serialises a page of 50 jobs several times faster than the stdlib encoder.
        "drf_orjson_renderer.renderers.ORJSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": [
        "drf_orjson_renderer.parsers.ORJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "apps.accounts.api.errors.exception_handler",
    # DRF keys the errors of a list of objects by index ({"gpus": {0: {...}}}); orjson refuses int keys
    # unless told, which turned every such 400 into a 500 (found by tests/unit/test_schema_fuzz.py).
    "ORJSON_RENDERER_OPTIONS": (orjson.OPT_NON_STR_KEYS,),
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "DeepOpt API",
    "DESCRIPTION": "Share a GPU cluster between teams: nodes, jobs, the fair queue and forecasts.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "JobStateEnum": "apps.scheduling.states.JobState",
        "JobKindEnum": "apps.scheduling.models.Job.Kind",
        "JobEventKindEnum": "apps.scheduling.models.JobEvent.Kind",
        "NodeStateEnum": "apps.cluster.models.GpuNode.State",
        "DeviceTypeEnum": "apps.cluster.models.GpuNode.DeviceType",
        "WeightFormatEnum": "apps.scheduling.specs.WEIGHT_FORMATS",
        "CompressionModelEnum": "apps.scheduling.specs.COMPRESSION_MODELS",
    },
}

# Live events (/ws/events/, apps/dashboard). Redis pub/sub by default: a group message is one PUBLISH that
# each web process receives once, where RedisChannelLayer keeps a Redis list per channel. bench/websocket.py
# with 2,000 sockets: p95 0.30-0.32 s on pub/sub, 0.23-0.67 s on core (docs/architecture.md, "Live
# updates", has the table). CHANNEL_LAYER=core selects the other.
CHANNELS_REDIS_URL = env("CHANNELS_REDIS_URL", default=REDIS_URL)
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": {"pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
                    "core": "channels_redis.core.RedisChannelLayer"}[env("CHANNEL_LAYER", default="pubsub")],
        # redis-py's default read timeout (5 s) equals the core layer's BZPOPMIN wait (5 s): idle sockets then
        # fail with "Timeout reading" at random. A longer one still ends a read from a Redis that hangs.
        "CONFIG": {"hosts": [{"address": CHANNELS_REDIS_URL, "socket_connect_timeout": 2, "socket_timeout": 10}]},
    }
}
# hub: one layer subscriber per process fans events out to its sockets (apps/dashboard/hub.py says why);
# groups: each socket joins its groups on the layer itself, as in Channels' tutorial.
DEEPOPT_LIVE_FANOUT = env("DEEPOPT_LIVE_FANOUT", default="hub")

# Celery: namespaced settings (CELERY_*), JSON only, explicit limits.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=REDIS_URL)
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=60 * 60 * 24)
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=60 * 60 * 24 - 60)
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = TIME_ZONE
CELERY_TASK_DEFAULT_QUEUE = "default"

CELERY_BEAT_SCHEDULE = {
    # Passes also run on submit, job end and node change; the tick catches whatever those missed.
    # Ticks expire: while no worker runs they must not pile up into a burst of passes at its start.
    "scheduling-tick": {"task": "scheduling.run_pass", "schedule": env.float("SCHEDULER_TICK_S", default=5.0),
                        "options": {"expires": 5.0}},
    # Nodes that stopped answering, attempts whose worker died, dispatches that never started
    # (apps/scheduling/reconciler.py). The database is the truth; this brings the cluster back in line.
    "reconciler": {"task": "scheduling.reconcile", "schedule": env.float("RECONCILER_INTERVAL_S", default=30.0),
                   "options": {"expires": 30.0}},
    # Load series (apps/forecasting/series.py): this minute's points, then downsampling and retention.
    "forecasting-rollup": {"task": "forecasting.rollup", "schedule": 60.0, "options": {"expires": 60.0}},
    # New forecasts for every worthy series (refits are cached and daily), then the autoscaler acts on them.
    "forecasting-refresh": {"task": "forecasting.refresh", "schedule": env.float("FORECAST_INTERVAL_S", default=300.0),
                            "options": {"expires": 300.0}},
}

# The scheduler (apps/scheduling/policy). Keys are PolicyConfig fields; docs/scheduler.md explains each
# default. Example: DEEPOPT_SCHEDULER = {"fair_share_half_life_s": 3 * 3600, "aging_s": 12 * 3600}.
# Preemption (jobs that have run less than the mark go first and may stop jobs past it, which resume
# from their checkpoints) is on by default for training jobs; these variables tune or switch it off.
DEEPOPT_SCHEDULER: dict = {
    "preemption": env.bool("DEEPOPT_PREEMPTION", default=True),
    "preempt_threshold_gpu_s": env.float("DEEPOPT_PREEMPT_THRESHOLD_GPU_HOURS", default=4.0) * 3600,
    "preempt_min_run_s": env.float("DEEPOPT_PREEMPT_MIN_RUN_S", default=1800.0),
    "preemptible_kinds": frozenset(env.list("DEEPOPT_PREEMPTIBLE_KINDS", default=["training"])),
    # Among jobs past the mark: slowdown (the one that has waited longest compared to its run first) or wfq.
    "served_order": env("DEEPOPT_SERVED_ORDER", default="slowdown"),
}
# Queue ETAs (a forward play of the first 1,000 queued jobs) are recomputed by a pass at most this often
# per worker process; passes in between keep the ETAs already written (apps/scheduling/live.py).
DEEPOPT_ETA_REFRESH_S = env.float("DEEPOPT_ETA_REFRESH_S", default=15.0)
# How a submit/job end/node change asks for a pass: celery (debounced task), inline (in the request;
# single-process setups and tests), off (the beat tick only).
DEEPOPT_SCHEDULER_TRIGGER = env("DEEPOPT_SCHEDULER_TRIGGER", default="celery")

# Job submission checks the job against the cluster's capacity, cached per process this long (seconds).
DEEPOPT_CAPACITY_CACHE_SECONDS = env.float("DEEPOPT_CAPACITY_CACHE_SECONDS", default=2.0)

# GPU nodes and their workers (apps/cluster/agent.py, apps/scheduling/{dispatch,reports,reconciler}.py).
# DEEPOPT_DISPATCH: celery (send allocated attempts to their nodes' queues) or off (nothing is sent).
DEEPOPT_DISPATCH = env("DEEPOPT_DISPATCH", default="celery")
DEEPOPT_WORKERS = {
    # A node whose agent has not heartbeaten for this long is `down`; its attempts are requeued.
    "node_silent_s": env.float("DEEPOPT_NODE_SILENT_S", default=60.0),
    # A running attempt whose worker has not reported (progress or status poll) for this long is lost.
    "attempt_silent_s": env.float("DEEPOPT_ATTEMPT_SILENT_S", default=60.0),
    # An allocation that no worker has started this long after dispatch is dispatched again ...
    "start_timeout_s": env.float("DEEPOPT_START_TIMEOUT_S", default=120.0),
    # ... this many times, after which the attempt is requeued (it may land on another node).
    "max_redispatches": env.int("DEEPOPT_MAX_REDISPATCHES", default=3),
    # Attempts the cluster ended (no worker ever started them, or a worker shutdown stopped them) use up
    # none of a job's max_attempts, up to this many; past it they count, so a job that nothing will
    # start still ends.
    "max_free_attempts": env.int("DEEPOPT_MAX_FREE_ATTEMPTS", default=5),
    # A `cancelling` job whose worker never confirms is ended this long after the cancel.
    "cancel_timeout_s": env.float("DEEPOPT_CANCEL_TIMEOUT_S", default=60.0),
    # How often agents heartbeat (the server tells them at registration).
    "heartbeat_interval_s": env.float("DEEPOPT_HEARTBEAT_INTERVAL_S", default=10.0),
    # Rendezvous port of a multi-node attempt on its first node: base + (job, attempt) hashed into span.
    "rendezvous_port_base": env.int("DEEPOPT_RENDEZVOUS_PORT_BASE", default=29500),
    "rendezvous_port_span": env.int("DEEPOPT_RENDEZVOUS_PORT_SPAN", default=2000),
    # Largest artifact a worker may upload (bytes); stored under MEDIA_ROOT/artifacts/.
    "artifact_max_bytes": env.int("DEEPOPT_ARTIFACT_MAX_BYTES", default=2 * 1024**3),
}

# Admin bootstrap used by `manage.py ensure_admin` (make run).
DEEPOPT_ADMIN_USER = env("DEEPOPT_ADMIN_USER", default="admin")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# Where users reach DeepOpt (e.g. https://deepopt.example.org): job-end webhooks then carry a full link to the
# job's page (`url`); empty: only its path.
DEEPOPT_PUBLIC_URL = env("DEEPOPT_PUBLIC_URL", default="").rstrip("/")

# --- Prometheus /metrics (apps/dashboard/metrics.py) ---
# Served to a request with `Authorization: Bearer <DEEPOPT_METRICS_TOKEN>` (empty: no token works) or
# from an address in DEEPOPT_METRICS_ALLOW (comma-separated IPs or CIDR networks); anything else is refused.
DEEPOPT_METRICS_TOKEN = env("DEEPOPT_METRICS_TOKEN", default="")
DEEPOPT_METRICS_ALLOW = env.list("DEEPOPT_METRICS_ALLOW", default=["127.0.0.1", "::1"])
# Scheduling passes record their timings in Redis (REDIS_URL) for /metrics; off skips that round trip.
DEEPOPT_PASS_STATS = env.bool("DEEPOPT_PASS_STATS", default=True)
