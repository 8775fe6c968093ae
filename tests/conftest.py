"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " " + FAKE_DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
