"""Aggregate worker results into results.json, results.md (tables + targets) and PNG plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any

# The targets of issue #5, checked on the largest causal-LM size of a run.
TARGETS = {
    "mem_vs_masoba": 0.55,  # peak memory bros / masoba (same hessian mode); aim 0.45
    "mem_vs_masoba_aim": 0.45,
    "mem_vs_plain": 1.0,  # peak memory bros / plain AdamW Trainer
    "time_vs_plain": 2.5,  # median step time bros / plain
    "loss_rel_diff": 0.02,  # |final target loss bros − masoba| / masoba
    "mixture_tv": 0.05,  # total variation between the final mixtures of bros and masoba
}
OPTIMIZER_NAMES = {"adamw_torch": "AdamW", "adafactor": "Adafactor"}  # --optim, as the report names it
STATE_CATEGORIES = (
    "weights",
    "gradients",
    "optimizer_state",
    "z",
    "coordinates",
    "sketches",
    "bilevel_buffers",
    "upper",
)


def load_runs(output_dir: str, names: list[str]) -> list[dict[str, Any]]:
    results = []
    for name in names:
        path = os.path.join(output_dir, "runs", f"{name}.json")
        if os.path.exists(path):
            with open(path) as handle:
                results.append(json.load(handle))
        else:
            results.append({"status": "missing", "name": name})
    return results


def _fmt(value: Any, spec: str = ".3g", missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def one_line(result: dict[str, Any]) -> str:
    if result.get("status") != "ok":
        return f"{result.get('name')}: {result.get('status')} {result.get('error', '')}"
    return (
        f"{result['name']}: peak {result['peak_mb']:.1f} MB, step {result['step_time_s']:.3f} s "
        f"(cpu {result['step_cpu_s']:.3f} s), {result['state_bytes_per_param_total']:.1f} B/param, "
        f"target loss {result['final_target_loss']:.4f}, checkpoint {_fmt(result.get('checkpoint_mb'), '.1f')} MB "
        f"saved in {_fmt(result.get('save_time_s'), '.2f')} s"
    )


def total_variation(a: dict[str, float] | None, b: dict[str, float] | None) -> float | None:
    if not a or not b:
        return None
    return 0.5 * sum(abs(a[k] - b.get(k, 0.0)) for k in a)


def _method_name(r: dict[str, Any]) -> str:
    return r.get("spec", {}).get("method_name") or r["name"].split("__", 1)[-1]


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per successful result, with ratios to ``plain`` and to ``masoba`` (same hessian mode)."""
    ok = [r for r in results if r.get("status") == "ok"]
    by_key = {(r["size"], _method_name(r)): r for r in ok}
    rows = []
    for r in ok:
        name = _method_name(r)
        plain = by_key.get((r["size"], "plain"))
        mode = r.get("hessian_mode")
        suffix = "ag" if mode == "autograd" else "fd"
        masoba = by_key.get((r["size"], f"masoba-{suffix}")) if mode else None
        if name.startswith("masoba") and name != "masoba-ag":
            masoba_ref = by_key.get((r["size"], "masoba-ag"))
        else:
            masoba_ref = masoba
        row = {
            "size": r["size"],
            "family": r["family"],
            "n_params": r["n_params"],
            "steps": r["spec"]["steps"],
            "batch_size": r["spec"]["batch_size"],
            "seq_len": r.get("seq_len"),
            "device": r.get("device", "cpu"),
            "method": name,
            "peak_mb": r["peak_mb"],
            "peak_mb_steady": r.get("peak_mb_steady"),
            "step_time_s": r["step_time_s"],
            "step_cpu_s": r["step_cpu_s"],
            "bytes_per_param": r["state_bytes_per_param_total"],
            "save_time_s": r.get("save_time_s"),
            "checkpoint_mb": r.get("checkpoint_mb"),
            "final_target_loss": r["final_target_loss"],
            "initial_target_loss": r["initial_target_loss"],
            "mixture_final": r.get("mixture_final"),
            "mixture_average": r.get("mixture_average"),
            "mem_vs_plain": r["peak_mb"] / plain["peak_mb"] if plain and plain["peak_mb"] > 0 else None,
            "time_vs_plain": r["step_time_s"] / plain["step_time_s"] if plain else None,
            "cpu_vs_plain": r["step_cpu_s"] / plain["step_cpu_s"]
            if plain and plain["step_cpu_s"] > 0
            else None,
            "mem_vs_masoba": (
                r["peak_mb"] / masoba_ref["peak_mb"]
                if masoba_ref and masoba_ref is not r and masoba_ref["peak_mb"] > 0
                else None
            ),
            "masoba_ref": _method_name(masoba_ref) if masoba_ref and masoba_ref is not r else None,
            "loss_rel_diff": (
                (r["final_target_loss"] - masoba["final_target_loss"]) / masoba["final_target_loss"]
                if masoba and name.startswith("bros")
                else None
            ),
            "progress_vs_masoba": (
                (r["initial_target_loss"] - r["final_target_loss"])
                / (masoba["initial_target_loss"] - masoba["final_target_loss"])
                if masoba
                and name.startswith("bros")
                and masoba["initial_target_loss"] != masoba["final_target_loss"]
                else None
            ),
            "tv_final": total_variation(r.get("mixture_final"), masoba.get("mixture_final"))
            if masoba and name.startswith("bros")
            else None,
            "tv_average": (
                total_variation(r.get("mixture_average"), masoba.get("mixture_average"))
                if masoba and name.startswith("bros")
                else None
            ),
        }
        rows.append(row)
    return rows


def largest_lm_size(rows: list[dict[str, Any]]) -> str | None:
    lm = [row for row in rows if row["family"] in ("llama", "gpt2")]
    if not lm:
        return None
    return max(lm, key=lambda row: row["n_params"])["size"]


def quality_size(rows: list[dict[str, Any]]) -> str | None:
    """The causal-LM size with the most steps (ties: the larger model) that has an MA-SOBA run: the
    quality targets are read there, since a few-step run of a big model barely moves loss or mixture."""
    lm = [row for row in rows if row["family"] in ("llama", "gpt2") and row["method"].startswith("masoba")]
    if not lm:
        return None
    return max(lm, key=lambda row: (row["steps"], row["n_params"]))["size"]


def check_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pass/fail of each target for every bros configuration: memory and time at the largest causal-LM
    size, target loss and mixture at :func:`quality_size`."""
    size = largest_lm_size(rows)
    q_size = quality_size(rows)
    quality = {row["method"]: row for row in rows if row["size"] == q_size}
    checks = []
    for row in rows:
        if row["size"] != size or not row["method"].startswith("bros"):
            continue
        q = quality.get(row["method"], {})
        loss = q.get("loss_rel_diff")
        entry = {"method": row["method"]}
        for key, limit, value in (
            ("mem_vs_masoba", TARGETS["mem_vs_masoba"], row["mem_vs_masoba"]),
            ("mem_vs_plain", TARGETS["mem_vs_plain"], row["mem_vs_plain"]),
            # On CPU the check uses the CPU-time ratio: wall clock is distorted by other load on a shared machine.
            (
                "time_vs_plain",
                TARGETS["time_vs_plain"],
                row["cpu_vs_plain"] if row["device"] == "cpu" else row["time_vs_plain"],
            ),
            ("loss_rel_diff", TARGETS["loss_rel_diff"], None if loss is None else abs(loss)),
            ("mixture_tv", TARGETS["mixture_tv"], q.get("tv_final")),
        ):
            entry[key] = {
                "value": value,
                "limit": limit,
                "met": None if value is None else bool(value <= limit),
            }
        entry["mem_vs_masoba"]["aim_met"] = (
            None
            if row["mem_vs_masoba"] is None
            else bool(row["mem_vs_masoba"] <= TARGETS["mem_vs_masoba_aim"])
        )
        entry["cpu_vs_plain"] = row["cpu_vs_plain"]
        entry["wall_vs_plain"] = row["time_vs_plain"]
        entry["progress_vs_masoba"] = q.get("progress_vs_masoba")
        checks.append(entry)
    summary = {}
    for key in ("mem_vs_masoba", "mem_vs_plain", "time_vs_plain", "loss_rel_diff", "mixture_tv"):
        met = [c["method"] for c in checks if c[key]["met"]]
        summary[key] = {"met_by": met, "missed_by": [c["method"] for c in checks if c[key]["met"] is False]}
    return {"size": size, "quality_size": q_size, "targets": TARGETS, "checks": checks, "summary": summary}


def _batch_str(row: dict[str, Any]) -> str:
    """``B × T tokens`` for a causal LM, ``B`` otherwise (older results without the field: ``B``)."""
    return f"{row['batch_size']} × {row['seq_len']} tokens" if row.get("seq_len") else str(row["batch_size"])


def _mixture_str(mixture: dict[str, float] | None) -> str:
    if not mixture:
        return "—"
    return "/".join(f"{w:.2f}" for w in mixture.values())


def markdown(
    results: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    targets: dict[str, Any],
    settings: dict[str, Any],
) -> str:
    lines = ["# BROS vs MA-SOBA vs plain Trainer", ""]
    ok = [r for r in results if r.get("status") == "ok"]
    if ok:
        lines.append(f"- Memory: {ok[0]['memory_method']}.")
        warmups = " or ".join(str(w) for w in sorted({r["timing_warmup"] for r in ok}))
        lines.append(
            f"- Step time: median wall clock of one optimizer step (callback on_step_begin → on_step_end) after "
            f"{warmups} warm-up steps (per size); `cpu` = median process CPU time (robust to other load on the machine)."
        )
        if settings.get("timing_size"):
            timed = ", ".join(settings.get("timing_sizes") or [settings["timing_size"]])
            lines.append(
                f"- At {timed} (the largest causal LM of each family; the time targets are read at "
                f"{settings['timing_size']}) step and checkpoint-save times come from a second run of each "
                "configuration without MALLOC_MMAP_THRESHOLD_, which slows allocation-heavy steps; other sizes' "
                "times include that slowdown."
            )
        lines.append(
            f"- Setting: profile `{settings.get('profile')}`, device `{settings.get('device')}`, "
            f"{'bf16 mixed precision' if settings.get('bf16') else 'fp32'}, batch per size (headings), "
            f"{OPTIMIZER_NAMES.get(settings.get('optim', 'adamw_torch'), settings.get('optim'))} lr {settings.get('lr')} "
            "(lower level; BROS/MA-SOBA keep its state in "
            f"coordinates), upper lr {settings.get('upper_lr') or 'default'}, aux lr {settings.get('aux_lr') or 'default'}, "
            f"seed {settings.get('seed')}, torch {ok[0].get('torch')} ({ok[0].get('threads')} threads), "
            f"transformers {ok[0].get('transformers')}."
        )
        lines.append(
            "- Data: synthetic 3-domain task, domains match/other/noise (target = fresh samples of `match`). "
            "Target loss: mean loss on a fixed held-out target sample after the last step. Mixture: final learned "
            "weights match/other/noise. Δ, progress (= target-loss reduction / MA-SOBA's reduction) and TV (total "
            "variation of the final mixtures) compare each BROS run with MA-SOBA of the same hessian mode."
        )
        lines.append(
            "- B/param: bytes held between steps per trainable parameter (weights, gradients, optimizer state, z, "
            "coordinates, sketches, accumulated bilevel buffers)."
        )
        lines.append(
            "- save s / ckpt MB: wall clock of one full Trainer checkpoint save after the last step "
            "(`_save_checkpoint`: model, optimizer, scheduler, RNG and trainer state, and BROSTrainer's bilevel "
            "state and learned mixture) into a temporary folder, and the bytes it wrote."
        )
    lines.append("")
    sizes = []
    for row in rows:
        if row["size"] not in sizes:
            sizes.append(row["size"])
    header = (
        "| method | peak MB | ×masoba | ×plain | step s | ×plain | cpu ×plain | B/param | save s | ckpt MB "
        "| target loss | Δ vs masoba | progress | TV | mixture |"
    )
    for size in sizes:
        size_rows = [row for row in rows if row["size"] == size]
        first = size_rows[0]
        lines.append(
            f"## {size} ({first['n_params'] / 1e6:.2f}M parameters, {first['steps']} steps, "
            f"batch {_batch_str(first)}, initial target loss {first['initial_target_loss']:.3f})"
        )
        lines.append("")
        lines.append(header)
        lines.append("|" + "---|" * 15)
        for row in size_rows:
            lines.append(
                "| "
                + " | ".join(
                    [
                        row["method"],
                        _fmt(row["peak_mb"], ".1f"),
                        _fmt(row["mem_vs_masoba"], ".2f"),
                        _fmt(row["mem_vs_plain"], ".2f"),
                        _fmt(row["step_time_s"], ".3f"),
                        _fmt(row["time_vs_plain"], ".2f"),
                        _fmt(row["cpu_vs_plain"], ".2f"),
                        _fmt(row["bytes_per_param"], ".1f"),
                        _fmt(row["save_time_s"], ".2f"),
                        _fmt(row["checkpoint_mb"], ".1f"),
                        _fmt(row["final_target_loss"], ".4f"),
                        _fmt(None if row["loss_rel_diff"] is None else 100 * row["loss_rel_diff"], "+.2f")
                        + ("%" if row["loss_rel_diff"] is not None else ""),
                        _fmt(row["progress_vs_masoba"], ".2f"),
                        _fmt(row["tv_final"], ".3f"),
                        _mixture_str(row["mixture_final"]),
                    ]
                )
                + " |"
            )
        lines.append("")
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        lines.append("## Failed configurations")
        lines.append("")
        for r in failed:
            lines.append(
                f"- {r.get('name')}: {r.get('status')} — {r.get('error', '')} (log: {r.get('log', '?')})"
            )
        lines.append("")
    # State breakdown at the largest LM size.
    size = targets.get("size")
    if size:
        lines.append(f"## State per trainable parameter at {size} (bytes/param)")
        lines.append("")
        lines.append("| method | " + " | ".join(STATE_CATEGORIES) + " | total |")
        lines.append("|" + "---|" * (len(STATE_CATEGORIES) + 2))
        for r in ok:
            if r["size"] != size:
                continue
            per = r["state_bytes_per_param"]
            cells = [_fmt(per.get(c, 0.0), ".2f") for c in STATE_CATEGORIES]
            lines.append(
                f"| {_method_name(r)} | " + " | ".join(cells) + f" | {r['state_bytes_per_param_total']:.2f} |"
            )
        lines.append("")
        lines.append(f"## Targets at the largest causal-LM size ({size})")
        lines.append("")
        lines.append(
            f"Memory and time at {size}; target loss and mixture at {targets.get('quality_size')} (the causal-LM "
            "size with the most steps: short runs of big models barely move either). Time: the CPU-time ratio on "
            "CPU (wall clock in parentheses; other jobs on a shared machine distort it), the wall-clock ratio on CUDA."
        )
        lines.append("")
        t = TARGETS
        lines.append(
            f"| bros config | mem ×masoba ≤ {t['mem_vs_masoba']} (aim {t['mem_vs_masoba_aim']}) | mem ×plain ≤ {t['mem_vs_plain']} "
            f"| time ×plain ≤ {t['time_vs_plain']} (wall) | |Δ target loss| ≤ {100 * t['loss_rel_diff']:.0f}% | TV ≤ {t['mixture_tv']} |"
        )
        lines.append("|---|---|---|---|---|---|")

        def cell(check: dict[str, Any], spec: str, scale: float = 1.0, unit: str = "") -> str:
            if check["value"] is None:
                return "—"
            mark = "met" if check["met"] else "MISSED"
            return f"{format(check['value'] * scale, spec)}{unit} {mark}"

        for c in targets["checks"]:
            lines.append(
                f"| {c['method']} | {cell(c['mem_vs_masoba'], '.2f')} | {cell(c['mem_vs_plain'], '.2f')} "
                f"| {cell(c['time_vs_plain'], '.2f')} ({_fmt(c['wall_vs_plain'], '.2f')}) "
                f"| {cell(c['loss_rel_diff'], '.2f', 100, '%')} | {cell(c['mixture_tv'], '.3f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def memory_points(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """What ``memory_vs_size.png`` draws: per family (panel), per method (line), the points (size, trainable
    parameters, peak MB, batch) in order of size. Every size of ``rows`` is there, CPU plans from the
    smallest Llama to the 100M+ causal LMs."""
    panels: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for family in ("llama", "gpt2", "vit"):
        for row in sorted((row for row in rows if row["family"] == family), key=lambda row: row["n_params"]):
            point = {
                "size": row["size"],
                "n_params": row["n_params"],
                "peak_mb": row["peak_mb"],
                "batch": _batch_str(row),
            }
            panels.setdefault(family, {}).setdefault(row["method"], []).append(point)
    return panels


def plot(results: list[dict[str, Any]], rows: list[dict[str, Any]], output_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    methods = []
    for row in rows:
        if row["method"] not in methods:
            methods.append(row["method"])
    style = {m: ("--" if m.endswith("-fd") else "-") for m in methods}
    palette = plt.get_cmap("tab10").colors
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}  # one color per method, every panel
    # 1. peak memory vs model size, one panel per family, every size labelled with its batch
    panels = memory_points(rows)
    if panels:
        figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for axis, (family, by_method) in zip(axes[0], panels.items(), strict=True):
            labels: dict[int, tuple[float, str]] = {}
            for method, points in by_method.items():
                axis.plot(
                    [p["n_params"] for p in points],
                    [p["peak_mb"] for p in points],
                    style[method],
                    color=color[method],
                    marker="o",
                    label=method,
                )
                for p in points:
                    if p["peak_mb"] >= labels.get(p["n_params"], (-math.inf, ""))[0]:
                        labels[p["n_params"]] = (p["peak_mb"], f"{p['size']}\nbatch {p['batch']}")
            for n_params, (peak, label) in labels.items():
                axis.annotate(
                    label,
                    (n_params, peak),
                    textcoords="offset points",
                    xytext=(0, 5),
                    ha="center",
                    fontsize=6,
                )
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel("trainable parameters")
            axis.set_ylabel("peak memory of a training step (MB)")
            axis.set_title(family)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
        path = os.path.join(output_dir, "memory_vs_size.png")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    # 2. target loss vs step, one panel per size
    ok = [r for r in results if r.get("status") == "ok" and r.get("target_curve")]
    sizes = []
    for r in ok:
        if r["size"] not in sizes:
            sizes.append(r["size"])
    if sizes:
        columns = min(3, len(sizes))
        rows_n = math.ceil(len(sizes) / columns)
        figure, axes = plt.subplots(rows_n, columns, figsize=(5.5 * columns, 4 * rows_n), squeeze=False)
        for index, size in enumerate(sizes):
            axis = axes[index // columns][index % columns]
            for r in ok:
                if r["size"] != size:
                    continue
                curve = [[0, r["initial_target_loss"]]] + r["target_curve"]
                name = _method_name(r)
                axis.plot(
                    [c[0] for c in curve],
                    [c[1] for c in curve],
                    style.get(name, "-"),
                    color=color.get(name),
                    label=name,
                )
            axis.set_xlabel("optimizer step")
            axis.set_ylabel("target loss (held-out)")
            axis.set_title(size)
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7)
        for index in range(len(sizes), rows_n * columns):
            axes[index // columns][index % columns].axis("off")
        path = os.path.join(output_dir, "target_loss_vs_step.png")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def write_report(
    results: list[dict[str, Any]], settings: dict[str, Any], output_dir: str, plots: bool = True
) -> dict[str, Any]:
    os.makedirs(output_dir, exist_ok=True)
    rows = compare(results)
    targets = check_targets(rows)
    payload = {"settings": settings, "rows": rows, "targets": targets, "results": results}
    json_path = os.path.join(output_dir, "results.json")
    with open(json_path + ".tmp", "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(json_path + ".tmp", json_path)
    md_path = os.path.join(output_dir, "results.md")
    with open(md_path + ".tmp", "w") as handle:
        handle.write(markdown(results, rows, targets, settings))
    os.replace(md_path + ".tmp", md_path)
    pngs = plot(results, rows, output_dir) if plots else []
    return {"json": json_path, "markdown": md_path, "plots": pngs}
