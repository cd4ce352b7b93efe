"""The benchmark's table: ratios side by side, and the KD-overhead lines."""

from __future__ import annotations

from collections.abc import Sequence

from fedjax_kd.bench.options import (
    ALGORITHMS,
    DTYPES,
    METHODS,
)

# --------------------------------------------------------------------------- table


def _fmt(value, spec: str) -> str:
    """``format(value, spec)``, or a right-aligned ``-`` of the same width for None."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 0))
    return format(value, spec)


def _method_label(row: dict) -> str:
    """``vmap``, ``vmap+donate``, ``vmap/c100`` (a chunked vmap row), ``loop``, ..."""
    label = row["method"] + ("+donate" if row.get("donate") else "")
    if row.get("chunk_size"):
        label += f"/c{row['chunk_size']}"
    return label


def format_table(rows: Sequence[dict]) -> str:
    """The printed summary: timings, vmap ratios per (algorithm, K) and the KD overhead."""
    workloads = dict.fromkeys(
        (r["input"], r.get("student"), r.get("teacher_model")) for r in rows if r.get("input")
    )
    lines = [
        f"input {text}: student {student}, teacher {teacher}"
        for text, student, teacher in workloads
    ]
    lines += [
        f"{'algorithm':<16}{'dtype':<6}{'K':>7}  {'method':<13}{'examples/s':>12}"
        f"{'s/round':>11}{'compile_s':>10}{'peak_rss_MB':>12}{'GFLOP/s':>9}",
    ]
    for r in rows:
        method = _method_label(r)
        lines.append(
            f"{r['algorithm']:<16}{r['dtype']:<6}{r['clients']:>7}  {method:<13}"
            f"{_fmt(r['examples_per_s'], '12,.0f')}{_fmt(r['s_per_round'], '11.4f')}"
            f"{r['compile_s']:>10.2f}{r['peak_rss_mb']:>12.0f}"
            f"{_fmt(r.get('gflops_per_s'), '9.2f')}"
            + (f"  ({r['skipped']})" if r.get("skipped") else "")
        )
    index = {
        (r["algorithm"], r["dtype"], r["clients"], r["method"], r["donate"]): r
        for r in rows
        if not r.get("compare_chunk")
    }
    compared = {
        (r["algorithm"], r["dtype"], r["clients"]): r for r in rows if r.get("compare_chunk")
    }
    chunk_label = next((f"c{r['chunk_size']}" for r in compared.values()), None)

    def eps(*k):
        r = index.get(k)
        return r["examples_per_s"] if r else None

    def ratio(a, b):
        return None if a is None or b is None else a / b

    has_donate = any(r.get("donate") for r in rows)
    has_bf16 = any(r["dtype"] == "bf16" for r in rows)
    lines += [
        "",
        "ratios of examples/s (> 1: vmap faster)",
        f"{'algorithm':<16}{'dtype':<6}{'K':>7}{'vmap/central':>14}{'vmap/loop':>11}"
        + (f"{'donate/vmap':>13}" if has_donate else "")
        + (
            f"{chunk_label + '/central':>14}{chunk_label + '/loop':>11}{chunk_label + '/vmap':>11}"
            if chunk_label
            else ""
        )
        + (f"{'vmap bf16/f32':>15}" if has_bf16 else ""),
    ]
    groups = sorted({(r["algorithm"], r["dtype"], r["clients"]) for r in rows}, key=_group_order)
    for alg, dtype, k in groups:
        vmap = eps(alg, dtype, k, "vmap", False)
        to_central = ratio(vmap, eps(alg, dtype, k, "central", False))
        to_loop = ratio(vmap, eps(alg, dtype, k, "loop", False))
        line = f"{alg:<16}{dtype:<6}{k:>7}{_fmt(to_central, '14.2f')}{_fmt(to_loop, '11.2f')}"
        if has_donate:
            line += _fmt(ratio(eps(alg, dtype, k, "vmap", True), vmap), "13.2f")
        if chunk_label:
            row = compared.get((alg, dtype, k))
            chunked = row["examples_per_s"] if row else None
            line += _fmt(ratio(chunked, eps(alg, dtype, k, "central", False)), "14.2f")
            line += _fmt(ratio(chunked, eps(alg, dtype, k, "loop", False)), "11.2f")
            line += _fmt(ratio(chunked, vmap), "11.2f")
        if has_bf16:
            f32 = eps(alg, "f32", k, "vmap", False)
            line += _fmt(ratio(vmap, f32) if dtype == "bf16" else None, "15.2f")
        lines.append(line)
    kd_lines = []
    for dtype, k in sorted(
        {(d, k) for _, d, k in groups}, key=lambda t: (DTYPES.index(t[0]), t[1])
    ):
        pairs = [
            (
                m,
                index.get(("fedavg", dtype, k, m, False)),
                index.get(("teacher_student", dtype, k, m, False)),
            )
            for m in METHODS
        ]
        if chunk_label:
            pairs.insert(
                1,
                (
                    f"vmap/{chunk_label}",
                    compared.get(("fedavg", dtype, k)),
                    compared.get(("teacher_student", dtype, k)),
                ),
            )
        for method, fa, ts in pairs:
            if not fa or not ts or not fa["s_per_round"] or not ts["s_per_round"]:
                continue
            student_train = fa["flops_per_round"]
            teacher_fwd = ts["flops_per_round"] - student_train
            extra = ts["s_per_round"] - fa["s_per_round"]
            at_student = fa["s_per_round"] * teacher_fwd / student_train
            at_teacher = ts.get("teacher_forward_s")
            kd_lines.append(
                f"{dtype:<6}{k:>7}  {method:<10}"
                f"{fa['s_per_round']:>10.4f}{ts['s_per_round']:>11.4f}"
                f"{extra:>11.4f}{at_student:>14.4f}{extra / at_student:>9.2f}"
                f"{_fmt(at_teacher, '14.4f')}{_fmt(ratio(extra, at_teacher), '9.2f')}"
            )
    if kd_lines:
        ts_row = next(r for r in rows if r["algorithm"] == "teacher_student")
        f_teacher = ts_row["teacher_forward_flops"]
        f_train = 3 * ts_row["epochs"] * ts_row["student_forward_flops"]
        lines += [
            "",
            "KD overhead: extra_s = teacher_student round - fedavg round (frozen teacher, "
            "server distillation off), predicted from the teacher's forward FLOPs "
            "(once per example per round) at two FLOP rates:",
            "  pred@student = fedavg_s * teacher forward FLOPs / student training FLOPs = "
            f"fedavg_s * {f_teacher:,} / {f_train:,} = fedavg_s * {f_teacher / f_train:.2f} "
            "(the student training step's FLOP rate)",
            "  pred@teacher = teacher forward FLOPs / the FLOP rate of the teacher's forward "
            "on the cohort timed alone, in the row's chunks (= its time)",
            f"{'dtype':<6}{'K':>7}  {'method':<10}{'fedavg_s':>10}{'kd_s':>11}{'extra_s':>11}"
            f"{'pred@student':>14}{'ratio':>9}{'pred@teacher':>14}{'ratio':>9}",
            *kd_lines,
        ]
    return "\n".join(lines)


def _group_order(group):
    alg, dtype, k = group
    return (ALGORITHMS.index(alg), DTYPES.index(dtype), k)
