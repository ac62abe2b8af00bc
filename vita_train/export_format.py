"""The export directory format (torch-free): what ``vita.json`` holds and how it is checked.

Shared by the exporter (which writes it) and the runtime's graph backends (which read it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

FORMAT_NAME = "vita-toolkit-export"
FORMAT_VERSION = 1
METADATA_FILE = "vita.json"
DETECTOR_FILE = "detector.onnx"
TOKENS_FILE = "vita_tokens.onnx"
DETECTOR_ENGINE = "detector.engine"
TOKENS_ENGINE = "vita_tokens.engine"
# the token engine as step graphs (vita_train.token_steps), what the onnxruntime backend runs; exports made
# before them hold only vita_tokens.onnx
STEP_KINDS = ("encode", "attend", "decode")
TOKEN_STEPS_KEY = "vita_token_steps"


class ExportFormatError(ValueError):
    """An export directory is missing, damaged or of a format version this code does not know."""


def step_file(kind: str, layer: int) -> str:
    """File name of one token step graph, e.g. ``vita_step.encode0.onnx``."""
    return f"vita_step.{kind}{layer}.onnx"


def token_step_files(export_dir: Path, meta: dict[str, Any]) -> Optional[dict[str, list[str]]]:
    """The step graphs vita.json lists ({"encode": [...], "attend": [...], "decode": [...]}), None when it lists none
    (an export made before they existed); raises ExportFormatError when a listed file is missing."""
    entry = meta.get("graphs", {}).get(TOKEN_STEPS_KEY)
    if entry is None:
        return None
    try:
        files = {kind: [str(name) for name in entry[kind]["files"]] for kind in STEP_KINDS}
    except (KeyError, TypeError):
        raise ExportFormatError(f"{export_dir}/{METADATA_FILE} lists the token step graphs incompletely; export the model again") from None
    for name in (n for names in files.values() for n in names):
        if not (Path(export_dir) / name).is_file():
            raise ExportFormatError(f"{export_dir} lacks {name}; export the model again")
    return files


def is_export_dir(path: Path) -> bool:
    """True when ``path`` is a directory holding a vita.json."""
    return path.is_dir() and (path / METADATA_FILE).is_file()


def read_metadata(export_dir: Path) -> dict[str, Any]:
    """Load and check ``vita.json``; refuse unknown format versions and missing graph files."""
    path = Path(export_dir) / METADATA_FILE
    if not path.is_file():
        raise ExportFormatError(f"{export_dir} has no {METADATA_FILE}: it is not an export made by `python -m export`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"{path} is not valid JSON ({e}); export the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ExportFormatError(f"{path} is not VITA export metadata (no format {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportFormatError(
            f"{export_dir} is export format version {version}; this toolkit reads version {FORMAT_VERSION}. "
            "Export the checkpoint again with this version, or install the toolkit version that made it."
        )
    for name in (DETECTOR_FILE, TOKENS_FILE):
        if not (Path(export_dir) / name).is_file():
            raise ExportFormatError(f"{export_dir} lacks {name}; export the model again")
    return meta
