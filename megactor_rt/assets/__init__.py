"""Media shipped with the package (demo portrait and driving clip; see README.md in this folder)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
