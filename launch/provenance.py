"""Where a run came from, recorded under `provenance:` in its config.yaml (and in a sweep cell's
result.json): the commit of the code and whether the checkout had uncommitted changes, the
versions of Python, torch and DeepSpeed, and the fingerprint of the data (data/meta.py). A record,
not a setting: reading a config.yaml back ignores it."""

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(data_fingerprint):
    """{commit, dirty, python, torch, deepspeed, data}; commit and dirty are None outside a git checkout."""
    import deepspeed
    import torch

    # only Fathom's own checkout: an installed copy may sit inside some other repository
    commit = _git("rev-parse", "HEAD") if (ROOT / ".git").exists() else None
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"commit": commit, "dirty": dirty, "python": platform.python_version(), "torch": str(torch.__version__),
            "deepspeed": deepspeed.__version__, "data": data_fingerprint}
