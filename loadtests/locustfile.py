"""Locust users that talk to peft_llm the way clients do, with adapters chosen by a traffic pattern.

Headless, for example::

    locust -f loadtests/locustfile.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:8000 \\
        --peft-protocol http --peft-pattern zipf --peft-adapters pirate,robot,chef --csv results/run

Add ``,loadtests/shapes/step.py`` or ``,loadtests/shapes/sustained.py`` to ``-f`` for a load profile.
Every option also reads an environment variable (``PEFTSERVE_PROTOCOL`` ...). Each response is checked:
a wrong ``adapter_version`` or an empty answer counts as a failure.
"""

from __future__ import annotations

import itertools
import json
import time
from urllib.parse import urlparse

import tritonclient.http as httpclient
from locust import User, events, task

from loadtests.perf_sweep import PROMPTS
from loadtests.traffic import PATTERNS, TrafficPattern
from tools.client import build_inputs


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument(
        "--peft-protocol",
        choices=["http", "generate"],
        default="http",
        env_var="PEFTSERVE_PROTOCOL",
        # gRPC under locust's gevent loop hung here even with grpc's gevent support; perf_sweep drives gRPC.
        help="tritonclient HTTP infer, or the generate endpoint",
    )
    parser.add_argument("--peft-pattern", choices=PATTERNS, default="uniform", env_var="PEFTSERVE_PATTERN")
    parser.add_argument("--peft-adapters", default="pirate,robot,chef,poet", env_var="PEFTSERVE_ADAPTERS")
    parser.add_argument("--peft-max-tokens", type=int, default=16, env_var="PEFTSERVE_MAX_TOKENS")
    parser.add_argument(
        "--peft-ignore-eos",
        action="store_true",
        env_var="PEFTSERVE_IGNORE_EOS",
        help="every request generates exactly max tokens",
    )


class PeftUser(User):
    """One client; requests back to back (add ``wait_time`` in a subclass to pace them)."""

    _sequence = itertools.count()

    def on_start(self) -> None:
        options = self.environment.parsed_options
        adapters = tuple(a for a in options.peft_adapters.split(",") if a)
        pattern = TrafficPattern(options.peft_pattern, () if options.peft_pattern == "base" else adapters)
        self.adapters = itertools.cycle(pattern.sample(1000, seed=next(self._sequence)))
        self.prompts = itertools.cycle(PROMPTS)
        self.protocol = options.peft_protocol
        self.max_tokens = options.peft_max_tokens
        self.ignore_eos = options.peft_ignore_eos
        self.name = pattern.label
        address = urlparse(self.host).netloc or self.host
        self.client = httpclient.InferenceServerClient(address, network_timeout=120)

    @task
    def complete(self) -> None:
        adapter_id, prompt = next(self.adapters), next(self.prompts)
        started = time.perf_counter()
        exception, length = None, 0
        try:
            text, version = self._send(prompt, adapter_id)
            length = len(text)
            expected = f"{adapter_id}@" if adapter_id else ""
            if not version.startswith(expected) or (adapter_id == "") != (version == ""):
                raise AssertionError(f"asked for {adapter_id!r}, served by {version!r}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported to locust, none stops the user
            exception = exc
        events.request.fire(
            request_type=self.protocol, name=self.name, response_time=1000 * (time.perf_counter() - started),
            response_length=length, exception=exception, context={"adapter": adapter_id},
        )  # fmt: skip

    def _send(self, prompt: str, adapter_id: str) -> tuple[str, str]:
        if self.protocol == "generate":
            body = {"text_input": prompt, "adapter_id": adapter_id, "max_tokens": self.max_tokens}
            if self.ignore_eos:
                body["ignore_eos"] = True
            response = self.client._post(  # tritonclient's own HTTP session, pooled per user
                request_uri="v2/models/peft_llm/generate", request_body=json.dumps(body), headers={}, query_params=None
            )
            answer = json.loads(response.read())
            if response.status_code != 200:
                raise RuntimeError(answer.get("error", f"HTTP {response.status_code}"))
            return answer["text_output"], answer["adapter_version"]
        inputs = build_inputs(
            httpclient, prompt, adapter_id, self.max_tokens, always_send_adapter=True, ignore_eos=self.ignore_eos
        )
        result = self.client.infer("peft_llm", inputs)
        return result.as_numpy("text_output")[0, 0].decode(), result.as_numpy("adapter_version")[0, 0].decode()
