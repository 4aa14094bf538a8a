"""Step profile: add users in steps to find where latency bends (``-f locustfile.py,shapes/step.py``)."""

from __future__ import annotations

import os

from locust import LoadTestShape


class StepShape(LoadTestShape):
    step_users = int(os.environ.get("PEFTSERVE_STEP_USERS", "4"))
    step_seconds = float(os.environ.get("PEFTSERVE_STEP_SECONDS", "30"))
    steps = int(os.environ.get("PEFTSERVE_STEPS", "4"))

    def tick(self):
        step = int(self.get_run_time() // self.step_seconds)
        if step >= self.steps:
            return None
        users = self.step_users * (step + 1)
        return users, users
