"""Test-wide settings: run JAX on the CPU in float32 and keep TF off any GPU."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
