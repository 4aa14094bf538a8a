"""Sustained profile: a fixed number of users for a long time, e.g. 10 minutes before taking traffic."""

from __future__ import annotations

import os

from locust import LoadTestShape


class SustainedShape(LoadTestShape):
    users = int(os.environ.get("PEFTSERVE_USERS", "16"))
    seconds = float(os.environ.get("PEFTSERVE_SECONDS", "600"))

    def tick(self):
        return (self.users, self.users) if self.get_run_time() < self.seconds else None
