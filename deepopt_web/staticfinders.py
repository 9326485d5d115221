"""plotly.js from the installed plotly package as the static file `vendor/plotly.min.js` (no CDN, no copy
in the repository: the version is the one requirements.txt pins). Only that one file: the package's
directory also holds a 5 MB widget bundle that collectstatic has no reason to copy."""
from __future__ import annotations

from pathlib import Path

import plotly
from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

PLOTLY_DIR = Path(plotly.__file__).parent / "package_data"
FILES = {"vendor/plotly.min.js": "plotly.min.js"}


class PlotlyFinder(BaseFinder):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.storage = FileSystemStorage(location=str(PLOTLY_DIR))
        self.storage.prefix = "vendor"

    def check(self, **kwargs) -> list:  # noqa: ANN003
        return []

    def find(self, path: str, find_all: bool = False, **kwargs) -> str | list[str]:  # noqa: ANN003
        name = FILES.get(path)
        if name is None:
            return [] if find_all else ""
        found = str(PLOTLY_DIR / name)
        return [found] if find_all else found

    def list(self, ignore_patterns):  # noqa: ANN001, ANN201
        for name in FILES.values():
            yield name, self.storage
