"""Puts the repo root on sys.path so tests can `import flowrl` etc., and lists the scripts present."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
