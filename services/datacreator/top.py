"""`datacreator top`: a live terminal view of a running bus.

Requests and their progress come from the status topic; throughput, rejections, LLM calls, cost,
429s and consumer lag come from the services' `/metrics` endpoints (`--metrics URL`, repeatable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from datacreator.bus import KafkaError
from datacreator.bus.readback import StatusWatcher
from datacreator.config import Settings
from datacreator.contracts import RequestState, RequestStatus
from datacreator.remote import latest_statuses

PREFIX = "datacreator_"


# -- metrics -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class MetricsSnapshot:
    """Samples scraped from one or more `/metrics` endpoints at one moment."""

    samples: list[Sample] = field(default_factory=list)
    taken_at: float = field(default_factory=time.monotonic)
    errors: dict[str, str] = field(default_factory=dict)  # url -> why it could not be read

    @classmethod
    def parse(cls, text: str, instance: str | None = None) -> MetricsSnapshot:
        """Parse the Prometheus text format; `instance` labels every sample with its source."""
        samples = []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = dict(s.labels)
                if instance is not None:
                    labels["instance"] = instance
                samples.append(Sample(s.name, labels, float(s.value)))
        return cls(samples)

    def merged(self, other: MetricsSnapshot) -> MetricsSnapshot:
        return MetricsSnapshot(self.samples + other.samples, min(self.taken_at, other.taken_at), {**self.errors, **other.errors})

    def select(self, name: str, **labels: str) -> Iterator[Sample]:
        for s in self.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                yield s

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        return sum(s.value for s in self.select(name, **labels))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """Sum of the samples of `name`, grouped by one label."""
        out: dict[str, float] = defaultdict(float)
        for s in self.select(name, **labels):
            out[s.labels.get(label, "")] += s.value
        return dict(out)

    def maximum(self, name: str, **labels: str) -> float:
        return max((s.value for s in self.select(name, **labels)), default=0.0)


async def scrape(urls: Iterable[str], http: httpx.AsyncClient | None = None, timeout_s: float = 2.0) -> MetricsSnapshot:
    """Read every endpoint at once; an unreachable one is noted in `errors`, not raised."""
    urls = list(urls)
    own = http is None
    http = http or httpx.AsyncClient(timeout=timeout_s)

    async def one(url: str) -> MetricsSnapshot:
        try:
            response = await http.get(url)
            response.raise_for_status()
            return MetricsSnapshot.parse(response.text, instance=url)
        except (httpx.HTTPError, ValueError) as exc:
            return MetricsSnapshot(errors={url: type(exc).__name__})

    try:
        snapshot = MetricsSnapshot()
        for part in await asyncio.gather(*(one(u) for u in urls)):
            snapshot = snapshot.merged(part)
        snapshot.taken_at = time.monotonic()
        return snapshot
    finally:
        if own:
            await http.aclose()


def metrics_url(value: str) -> str:
    """`host:port`, `http://host:port` or a full URL: the `/metrics` URL."""
    url = value if "://" in value else f"http://{value}"
    scheme, _, rest = url.partition("://")
    return url if "/" in rest else f"{scheme}://{rest}/metrics"


# -- the view --------------------------------------------------------------------------------------


@dataclass
class Overview:
    """Figures of the whole bus, from two consecutive snapshots (rates) or one (totals)."""

    examples_per_s: float | None
    accepted: float
    rejected: dict[str, float]
    llm_calls: dict[str, float]
    tokens: dict[str, float]
    cost_usd: float
    in_flight: dict[str, float]
    lag: dict[str, float]
    ratelimit_usage: dict[str, float]
    ratelimit_wait_s: float | None
    latency_s: float | None
    dedup_entries: float
    errors: dict[str, str]

    @classmethod
    def of(cls, now: MetricsSnapshot, before: MetricsSnapshot | None = None) -> Overview:
        accepted = now.total(PREFIX + "examples_accepted_total")
        rate = None
        if before is not None and now.taken_at > before.taken_at:
            done = accepted - before.total(PREFIX + "examples_accepted_total")
            rate = max(done, 0.0) / (now.taken_at - before.taken_at)
        return cls(
            examples_per_s=rate,
            accepted=accepted,
            rejected=now.by(PREFIX + "examples_rejected_total", "reason"),
            llm_calls=now.by(PREFIX + "llm_calls_total", "outcome"),
            tokens=now.by(PREFIX + "llm_tokens_total", "kind"),
            cost_usd=now.total(PREFIX + "llm_cost_usd_total"),
            in_flight=now.by(PREFIX + "in_flight_messages", "service"),
            lag=now.by(PREFIX + "consumer_lag_messages", "service"),
            ratelimit_usage={
                f"{s.labels.get('endpoint')} {s.labels.get('kind')}": s.value
                for s in now.select(PREFIX + "ratelimit_usage_ratio")
            },
            ratelimit_wait_s=_mean(now, PREFIX + "ratelimit_wait_seconds"),
            latency_s=_mean(now, PREFIX + "llm_latency_seconds"),
            dedup_entries=now.total(PREFIX + "dedup_state_entries"),
            errors=dict(now.errors),
        )


def _mean(snapshot: MetricsSnapshot, histogram: str) -> float | None:
    count = snapshot.total(histogram + "_count")
    return snapshot.total(histogram + "_sum") / count if count else None


def _fmt_counts(counts: dict[str, float], empty: str = "none") -> str:
    items = [(k, v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v]
    return ", ".join(f"{k} {v:g}" for k, v in items) or empty


def _bar(done: int, total: int, width: int = 20) -> str:
    share = min(done / total, 1.0) if total else 0.0
    filled = round(share * width)
    return "#" * filled + "." * (width - filled)


_STATE_STYLE = {
    RequestState.ACCEPTED: "cyan",
    RequestState.RUNNING: "yellow",
    RequestState.COMPLETED: "green",
}


def requests_table(statuses: Iterable[RequestStatus], limit: int = 20) -> Table:
    """Running requests first, then the latest finished ones."""
    rows = sorted(statuses, key=lambda s: (s.state.final, -(s.started_at or s.updated_at)))[:limit]
    table = Table(title="requests", title_justify="left", expand=False, pad_edge=False)
    for column, justify in (("request", "left"), ("state", "left"), ("progress", "left"), ("accepted", "right"),
                            ("rejected", "right"), ("calls", "right"), ("failed", "right"), ("cost $", "right"),
                            ("ex/s", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for s in rows:
        table.add_row(
            s.request_id,
            Text(s.state.value, style=_STATE_STYLE.get(s.state, "red")),
            _bar(s.accepted, s.target_count),
            f"{s.accepted}/{s.target_count}",
            str(sum(s.rejected.values())),
            str(s.llm_calls),
            str(s.failed_calls),
            f"{s.cost_usd:.4f}",
            f"{s.examples_per_second:.2f}",
        )
    if not rows:
        table.add_row("(no requests yet)", "", "", "", "", "", "", "", "")
    return table


def overview_table(view: Overview) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    rate = "n/a" if view.examples_per_s is None else f"{view.examples_per_s:.2f}"
    table.add_row("examples/s", rate)
    table.add_row("accepted", f"{view.accepted:g}")
    table.add_row("rejected", _fmt_counts(view.rejected))
    table.add_row("llm calls", _fmt_counts(view.llm_calls))
    table.add_row("429s", f"{view.llm_calls.get('429', 0):g}")
    table.add_row("tokens", f"{view.tokens.get('prompt', 0):g} in, {view.tokens.get('completion', 0):g} out")
    table.add_row("cost", f"${view.cost_usd:.4f}")
    latency = "n/a" if view.latency_s is None else f"{view.latency_s:.3f} s mean"
    wait = "n/a" if view.ratelimit_wait_s is None else f"{view.ratelimit_wait_s:.3f} s mean"
    table.add_row("llm latency", latency)
    table.add_row("limiter wait", wait)
    usage = ", ".join(f"{k} {v:.0%}" for k, v in sorted(view.ratelimit_usage.items())) or "n/a"
    table.add_row("limit in use", usage)
    table.add_row("in flight", _fmt_counts(view.in_flight, "0"))
    table.add_row("lag", _fmt_counts(view.lag, "0"))
    table.add_row("dedup state", f"{view.dedup_entries:g} examples")
    for url, error in sorted(view.errors.items()):
        table.add_row(Text("unreachable", style="red"), f"{url} ({error})")
    return table


def render(statuses: Iterable[RequestStatus], view: Overview | None, limit: int = 20) -> Group:
    parts: list = [Text(f"datacreator top   {time.strftime('%H:%M:%S')}   q quits", style="bold")]
    parts.append(requests_table(statuses, limit))
    if view is not None:
        parts.append(overview_table(view))
    else:
        parts.append(Text("no --metrics endpoints given", style="dim"))
    return Group(*parts)


# -- the command -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", action="append", default=[], metavar="URL",
                        help="a service's metrics endpoint (host:port or URL); repeatable")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    parser.add_argument("--limit", type=int, default=20, help="most requests shown")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")


async def _once(settings: Settings, urls: list[str], limit: int, console: Console) -> int:
    try:
        statuses = await latest_statuses(settings)
    except KafkaError as exc:
        print(f"datacreator top: cannot read {settings.topics.status} from {settings.kafka.bootstrap}: {exc}", file=sys.stderr)
        return 2
    view = None
    if urls:
        async with httpx.AsyncClient(timeout=2.0) as http:
            first = await scrape(urls, http)
            await asyncio.sleep(0.5)  # a second scrape gives a current rate
            view = Overview.of(await scrape(urls, http), first)
    console.print(render(statuses.values(), view, limit))
    return 0


@contextlib.contextmanager
def _keys(stop: asyncio.Event) -> Iterator[None]:
    """On a terminal, read keys without Enter; `q` sets `stop`."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def on_key() -> None:
        data = os.read(fd, 32)
        if not data or b"q" in data.lower() or b"\x03" in data:
            stop.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, on_key)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _live(settings: Settings, urls: list[str], interval: float, limit: int, console: Console) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    watcher = await StatusWatcher(settings).start()
    before: MetricsSnapshot | None = None
    view: Overview | None = None
    try:
        async with httpx.AsyncClient(timeout=min(interval, 2.0)) as http:
            with _keys(stop), Live(render([], None, limit), console=console, screen=True,
                                   auto_refresh=False, redirect_stdout=False) as live:
                while not stop.is_set():
                    if urls:
                        now = await scrape(urls, http)
                        view = Overview.of(now, before)
                        before = now
                    live.update(render(list(watcher.latest.values()), view, limit), refresh=True)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval)
    finally:
        await watcher.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    return 0


async def top_command(args: argparse.Namespace) -> int:
    settings = Settings()
    urls = [metrics_url(u) for u in args.metrics]
    console = Console()
    if args.once:
        return await _once(settings, urls, args.limit, console)
    return await _live(settings, urls, max(args.interval, 0.1), args.limit, console)
