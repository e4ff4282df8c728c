"""`rclip` makes torch's OpenMP threads sleep while waiting (OMP_WAIT_POLICY=PASSIVE) before torch loads, and keeps
a policy the user chose. The speed effect under load is measured by benchmarks/under_load.py, not here."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import os, rclip_cli.main, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy_seen(env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_rclip_sets_passive_waiting_unless_the_user_chose():
    assert _policy_seen(None) == "PASSIVE"
    assert _policy_seen("ACTIVE") == "ACTIVE"


def test_the_rclip_entry_point_is_the_module_that_sets_it():
    import importlib.metadata

    entry = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}["rclip"]
    assert entry.split(":")[0] == "rclip_cli.main"
