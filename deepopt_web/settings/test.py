"""Test settings: fast hashing, in-memory channel layer unless a test asks for Redis."""
from .base import *  # noqa: F403
from .base import env

DEBUG = False
SECRET_KEY = "test-only-not-a-secret"  # noqa: S105
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
AUTH_PASSWORD_VALIDATORS = []
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
# In memory, unless a test runs a real server whose events must cross processes (tests/browser/test_live.py
# sets TEST_CHANNELS_REDIS_URL for the server it starts).
if env("TEST_CHANNELS_REDIS_URL", default=""):
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                                  "CONFIG": {"hosts": [env("TEST_CHANNELS_REDIS_URL")]}}}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # noqa: F405
WHITENOISE_USE_FINDERS = True  # serve static/ without collectstatic while developing
# Unit tests run passes explicitly; integration tests that need the real trigger set "celery".
DEEPOPT_SCHEDULER_TRIGGER = env("DEEPOPT_SCHEDULER_TRIGGER", default="off")
# Unit tests allocate jobs on nodes that do not exist; integration tests that run real nodes set "celery".
DEEPOPT_DISPATCH = env("DEEPOPT_DISPATCH", default="off")
# Every test builds its own cluster: a capacity cached by the previous test would be wrong.
DEEPOPT_CAPACITY_CACHE_SECONDS = 0
# Pass times go to Redis for /metrics; unit tests would write into db 0 of whatever Redis runs (or wait
# on one that does not). tests/unit/test_metrics.py turns it on against its own database.
DEEPOPT_PASS_STATS = env.bool("DEEPOPT_PASS_STATS", default=False)
# Tests run passes back to back and read their ETAs: every pass computes them (15 s apart otherwise).
DEEPOPT_ETA_REFRESH_S = 0
