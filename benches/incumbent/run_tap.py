"""Runs the Singer tap-mixpanel 1.8.0 against a local Mixpanel simulator.

The tap hard-codes https://mixpanel.com and https://data.mixpanel.com; this wrapper rewrites
those URLs to the simulator (MIXPANEL_SIM_URL, e.g. http://127.0.0.1:8080) at run time by
wrapping requests.Session.request, then runs the tap's own entry point with the arguments given
(`--config`, `--catalog`, `--discover`). Nothing of the tap itself is changed.
"""

import os
import sys

import requests

SIM = os.environ["MIXPANEL_SIM_URL"].rstrip("/")
HOSTS = (
    "https://data.mixpanel.com",
    "https://mixpanel.com",
    "https://data-eu.mixpanel.com",
    "https://eu.mixpanel.com",
)
_request = requests.Session.request


def _to_sim(self, method, url, *args, **kwargs):
    for host in HOSTS:
        if url.startswith(host):
            url = SIM + url[len(host):]
            break
    return _request(self, method, url, *args, **kwargs)


requests.Session.request = _to_sim

import tap_mixpanel  # noqa: E402  (after the patch, as the tap imports requests itself)

if __name__ == "__main__":
    sys.argv[0] = "tap-mixpanel"
    tap_mixpanel.main()
