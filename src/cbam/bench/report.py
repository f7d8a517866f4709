"""Markdown tables of ratios from ``cbam bench`` results."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..report import format_rows


def _split(name: str) -> tuple[str, str]:
    """'module/8x256x56x56/float32/fwd/cbam-fused' -> ('module/8x256x56x56/float32', 'fwd/cbam-fused')."""
    parts = name.split("/")
    return "/".join(parts[:3]), "/".join(parts[3:])


def _ratio(case: dict[str, Any], base: float) -> tuple[float, str]:
    return case["median_s"] / base, f"{case['min_s'] / base:.2f}-{case['max_s'] / base:.2f}"


def module_tables(result: dict[str, Any]) -> list[str]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for name, case in result["cases"].items():
        if name.startswith("module/"):
            group, rest = _split(name)
            groups[group][rest] = case
    blocks = []
    for group, cases in groups.items():
        copy_s = cases["copy"]["median_s"]
        variants = sorted({rest.split("/", 1)[1] for rest in cases if "/" in rest}, key=_variant_order)
        rows = []
        for v in variants:
            row: dict[str, Any] = {"variant": v}
            for mode in ("fwd", "fwd+bwd"):
                case = cases.get(f"{mode}/{v}")
                if case:
                    row[f"{mode} (x copy)"], row[f"{mode} range"] = _ratio(case, copy_s)
            rows.append(row)
        _, shape, dtype = group.split("/")
        blocks.append(f"Module {shape} {dtype}: time as a multiple of one copy_ of the tensor "
                      f"(copy_ = {copy_s * 1e3:.2f} ms; median of {result['rounds']} interleaved rounds, range "
                      f"min-max)\n\n" + format_rows(rows, fmt="markdown", digits={"fwd (x copy)": 2,
                                                                                  "fwd+bwd (x copy)": 2}))
    return blocks


def _variant_order(v: str) -> tuple[int, str]:
    order = ["cbam-reference", "cbam-fused", "cbam-fused-compiled", "se", "se-compiled",
             "timm-cbam", "timm-cbam-compiled", "plain", "plain-compiled", "cbam-fused-no-tail",
             "cbam-fused-memory-efficient"]
    return (order.index(v) if v in order else len(order), v)


def network_table(result: dict[str, Any]) -> str | None:
    cases = {n: c for n, c in result["cases"].items() if n.startswith("network/")}
    if not cases:
        return None
    model = next(iter(cases)).split("/")[1]
    by_mode: dict[str, dict[str, dict]] = defaultdict(dict)
    for name, case in cases.items():
        _, _, mode, variant = name.split("/")
        by_mode[mode][variant] = case
    memory = result.get("memory", {})
    rows = []
    variants = sorted({v for m in by_mode.values() for v in m}, key=_variant_order)
    for v in variants:
        row: dict[str, Any] = {"variant": v}
        for mode in ("inference", "train-step"):
            base_key = "plain-compiled" if v.endswith("-compiled") else "plain"
            base = by_mode[mode].get(base_key)
            case = by_mode[mode].get(v)
            if case and base:
                row[f"{mode} (x plain)"], row[f"{mode} range"] = _ratio(case, base["median_s"])
                row[f"{mode} s"] = case["median_s"]
        mem = memory.get(v.removesuffix("-compiled")) if not v.endswith("-compiled") else None
        if mem and "plain" in memory:
            row["saved for backward (x plain)"] = mem["saved_bytes"] / memory["plain"]["saved_bytes"]
            row["saved MB"] = mem["saved_bytes"] / 1e6
            if "peak_bytes" in mem:
                row["peak MB"] = mem["peak_bytes"] / 1e6
        rows.append(row)
    digits = {"inference (x plain)": 2, "train-step (x plain)": 2, "inference s": 3, "train-step s": 3,
              "saved for backward (x plain)": 3, "saved MB": 0, "peak MB": 0}
    columns = ["variant", "inference (x plain)", "inference range", "train-step (x plain)", "train-step range",
               "saved for backward (x plain)", "saved MB", "inference s", "train-step s"]
    if any("peak MB" in r for r in rows):
        columns.append("peak MB")
    return (f"Network {model}: time as a multiple of the plain network's (median of {result['rounds']} "
            f"interleaved rounds); bytes saved for backward by one training step\n\n"
            + format_rows(rows, columns, fmt="markdown", digits=digits))


def allocator_table(results: list[dict[str, Any]]) -> str | None:
    if len(results) < 2:
        return None
    by_setting = {r["allocator"]: r for r in results}
    if not {"default", "tuned"} <= set(by_setting):
        return None
    rows = []
    for name, case in by_setting["default"]["cases"].items():
        tuned = by_setting["tuned"]["cases"].get(name)
        if not tuned or not (name.startswith("network/") or name.endswith("/copy")):
            continue
        rows.append({"case": name, "default allocator s": case["median_s"], "tuned allocator s": tuned["median_s"],
                     "tuned / default": tuned["median_s"] / case["median_s"]})
    return ("What the tuned allocator buys (MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ = 1e11; separate "
            "runs, so compare with the machine's noise in mind)\n\n"
            + format_rows(rows, fmt="markdown", digits={"default allocator s": 4, "tuned allocator s": 4,
                                                       "tuned / default": 2}))


def render_markdown(results: list[dict[str, Any]]) -> str:
    out = []
    for result in results:
        out.append(f"## {result['device']}, allocator: {result['allocator']} (torch {result['torch']}, "
                   f"{result['threads']} threads, {result['machine']['cpus']} CPUs, {result['machine']['platform']})")
        kernels = result.get("fused_cpu_kernels")
        if kernels:
            out.append(f"Fused CPU kernels: {kernels}.")
        out += module_tables(result)
        net = network_table(result)
        if net:
            out.append(net)
    alloc = allocator_table(results)
    if alloc:
        out.append(alloc)
    return "\n\n".join(out)
