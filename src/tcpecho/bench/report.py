"""Merging the processes' results, and the report: text for people, JSON for programs."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TextIO

from tcpecho.bench.loadgen import (
    HIST_HIGHEST_US,
    HIST_LOWEST_US,
    HIST_SIGNIFICANT_FIGURES,
    BenchOptions,
    ShareResult,
    loop_name,
)
from tcpecho.net import format_address

# Bump when a field of the JSON report changes meaning or goes away (adding one does not).
SCHEMA = "tcpecho.bench/1"
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}


def merge(results: list[ShareResult]) -> ShareResult:
    """One result from each process's: counts add up, latencies merge exactly (raw counts)."""
    merged = ShareResult()
    for result in results:
        merged.round_trips += result.round_trips
        merged.bytes_echoed += result.bytes_echoed
        merged.bytes_verified += result.bytes_verified
        merged.window = max(merged.window, result.window)
        merged.latencies_us.update(result.latencies_us)
        merged.connect_us.extend(result.connect_us)
        merged.mismatches.update(result.mismatches)
        merged.errors.update(result.errors)
        merged.connects += result.connects
        merged.tls_handshakes += result.tls_handshakes
        merged.tls = merged.tls or result.tls
    return merged


def histogram(latencies_us: Counter[int]) -> Any:
    """An HdrHistogram of the latencies (µs). Needs the ``bench`` extra (hdrhistogram)."""
    from hdrh.histogram import HdrHistogram

    hist = HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_SIGNIFICANT_FIGURES)
    for value, count in latencies_us.items():
        hist.record_value(min(max(value, HIST_LOWEST_US), HIST_HIGHEST_US), count)
    return hist


def build(options: BenchOptions, result: ShareResult, hist: Any) -> dict[str, Any]:
    """The report as one JSON-ready object; its keys are documented in docs/bench.md."""
    window = result.window
    count = hist.get_total_count()
    latency = {
        name: hist.get_value_at_percentile(p) if count else None for name, p in PERCENTILES.items()
    }
    latency["max"] = hist.get_max_value() if count else None
    latency["mean"] = round(hist.get_mean_value(), 1) if count else None
    connect = result.connect_us
    return {
        "schema": SCHEMA,
        "target": format_address((options.host, options.port)),
        "options": asdict(options),
        "loop": "open" if options.rate else "closed",
        "generator_loop": loop_name(),
        "latency_measured_from": "intended send time" if options.rate else "actual send time",
        "duration_s": round(window, 6),
        "round_trips": result.round_trips,
        "round_trips_per_s": round(result.round_trips / window, 1),
        "megabytes_per_s": round(result.bytes_echoed / window / 1e6, 3),
        "megabyte": "10^6 bytes of payload echoed, counted one way",
        "latency_us": latency,
        "connections_opened": len(connect),
        "connect_us": {
            "mean": round(sum(connect) / len(connect), 1) if connect else None,
            "max": round(max(connect), 1) if connect else None,
        },
        "connects": result.connects if options.reconnect else None,
        "connects_per_second": round(result.connects / window, 1) if options.reconnect else None,
        "tls": result.tls or None,
        "tls_handshakes": result.tls_handshakes,
        "bytes_verified": result.bytes_verified,
        "mismatches": dict(result.mismatches),
        "errors": dict(result.errors),
        "ok": not result.mismatches and not result.errors,
    }


def write_text(report: dict[str, Any], out: TextIO) -> None:
    options = report["options"]
    ending = (
        f"{options['requests']:,} requests" if options["requests"] else f"{options['duration']} s"
    )
    loop = f"open loop at {options['rate']:,.0f}/s" if options["rate"] else "closed loop"
    lat = report["latency_us"]
    extras = [
        "TLS" if options["tls"] else "",
        f"PROXY {options['send_proxy']}" if options["send_proxy"] else "",
        "reconnecting after each round trip" if options["reconnect"] else "",
    ]
    over = "".join(f", {extra}" for extra in extras if extra)
    lines = [
        f"tcpecho bench {report['target']}: {options['connections']} connections × "
        f"{options['size']} B, pipeline {options['pipeline']}, {loop}, {ending} "
        f"after {options['warmup']} s warm-up{over}",
        f"round trips  {report['round_trips']:,} in {report['duration_s']:.2f} s = "
        f"{report['round_trips_per_s']:,.0f}/s",
        f"throughput   {report['megabytes_per_s']:.2f} MB/s "
        "(1 MB = 10^6 bytes of payload echoed, one way)",
    ]
    if lat["max"] is not None:
        shown = "  ".join(
            f"{name.replace('_', '.')} {_ms(lat[name])}" for name in [*PERCENTILES, "max"]
        )
        lines.append(f"latency      {shown}  (from the {report['latency_measured_from']})")
    connect = report["connect_us"]
    if connect["mean"] is not None:
        opened = (
            f"{report['connections_opened']:,} connects in all"
            if options["reconnect"]
            else f"{report['connections_opened']} of {options['connections']} connected"
        )
        handshake = " (TLS handshake included)" if report["tls"] else ""
        lines.append(
            f"connect      mean {_ms(connect['mean'])}, max {_ms(connect['max'])}{handshake} "
            f"({opened})"
        )
    if report["connects_per_second"] is not None:
        lines.append(
            f"connects     {report['connects']:,} in {report['duration_s']:.2f} s = "
            f"{report['connects_per_second']:,.0f}/s, each with one round trip"
        )
    if report["tls"]:
        tls = report["tls"]
        lines.append(
            f"tls          {tls['version']} {tls['cipher']}, "
            f"{report['tls_handshakes']:,} handshakes"
        )
    mismatches = report["mismatches"]
    lines.append(
        f"checked      every echoed byte: {report['bytes_verified']:,} bytes, "
        + (_counts(mismatches) if mismatches else "no mismatch")
    )
    lines.append("errors       " + (_counts(report["errors"]) if report["errors"] else "none"))
    processes = f"{options['processes']} process" + ("es" if options["processes"] > 1 else "")
    lines.append(f"generator    {report['generator_loop']}, {processes}")
    out.write("\n".join(lines) + "\n")


def write_json(report: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(report) + "\n")


def write_hist_log(path: str, hist: Any, start: float, end: float) -> None:
    """The HdrHistogram interval log (values in µs), for HdrHistogram's own plotting tools."""
    from hdrh.log import HistogramLogWriter

    with open(path, "w") as out:
        writer = HistogramLogWriter(out)
        writer.output_comment("tcpecho bench round-trip latency, microseconds")
        writer.output_log_format_version()
        # hdrh's own output_start_time is broken (it mixes seconds and milliseconds).
        stamp = datetime.fromtimestamp(start, UTC).isoformat(" ")
        out.write(f"#[StartTime: {start:.3f} (seconds since epoch), {stamp}]\n")
        writer.output_legend()
        writer.output_interval_histogram(hist, 0, end - start)


def _ms(us: float) -> str:
    return f"{us / 1000:.3f} ms"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count:,} {kind}" for kind, count in sorted(counts.items()))
