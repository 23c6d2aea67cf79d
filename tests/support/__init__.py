"""Test support code: helpers shared by several test modules (not tests themselves)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
