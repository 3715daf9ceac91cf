"""Test-wide setup: the project root on sys.path, oneDNN on, and the shared data location."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')

SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
LPBA40 = os.path.join(SHARED, 'data', 'LPBA40')
