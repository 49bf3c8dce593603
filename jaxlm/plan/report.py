"""Readable tables of a plan (:func:`jaxlm.plan.planner.plan`) and of a mesh sweep.

Every figure the compiler did not produce is marked ``~`` (an estimate); the header line says
which source the plan came from (``compiled-tpu``, ``compiled-fake-devices``, ``analytic``).

Example::

    from jaxlm.plan.report import format_plan
    print(format_plan(plan_dict))
"""

from __future__ import annotations

from jaxlm.utils.flops import format_bytes


def _mesh(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def format_plan(p: dict) -> str:
    mem, road, chip = p["memory_per_chip_bytes"], p["roofline"], p["chip"]
    compiled_mem = p["source"] == "compiled-tpu"
    est = "" if compiled_mem else "~"
    m = p["model"]
    lines = [
        f"target     {p['target']}: {p['chips']} x {chip['name']} ({chip['peak_flops'] / 1e12:.4g}"
        f" TFLOP/s, {format_bytes(chip['hbm_bytes'])} at {chip['hbm_bw'] / 1e9:.4g} GB/s"
        + (f" read, {chip['write_bw'] / 1e9:.4g} GB/s write" if chip.get("write_bw") else "")
        + f"{', measured' if chip['kind'] == 'cpu' else ''})",
        f"source     {p['source']}" + (f" (compiled in {p['compile_s']:.1f} s)"
                                        if "compile_s" in p else ""),
        f"model      {m['params']:,} params, {m['dtype']}, remat {m['remat']}, batch "
        f"{m['batch_size']} x {m['seq_len']}, grad_accum {m['grad_accum']}",
        f"mesh       {_mesh(p['mesh'])}",
        "",
        "memory per chip",
    ]
    for key in ("params", "optimizer", "gradients", "activations", "arguments", "outputs",
                "alias", "temp", "generated_code"):
        if key in mem:
            mark = "" if key in ("params", "optimizer") or compiled_mem else "~"
            lines.append(f"  {key:<15}{mark}{format_bytes(mem[key]):>12}")
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    lines += [f"  {'total':<15}{est}{format_bytes(mem['total']):>12}   of "
              f"{format_bytes(p['hbm_per_chip_bytes'])}: {verdict} "
              f"(headroom {p['headroom'] * 100:.0f}%)", "",
              f"flops/step {p['flops_per_step']:.4g} executed ({p['model_flops_per_step']:.4g} "
              "model)",
              f"HBM bytes  ~{p['hbm_bytes_per_chip_per_step']:.4g} per chip per step", "",
              "collectives per step per chip (op, mesh axes, count x bytes = total, ~time)"]
    for c in p["collectives"]:
        if c["bytes"] < 1024:
            continue
        lines.append(f"  {c['op']:<19}{','.join(c['mesh_axes']):<13}{c['count']:>5} x "
                     f"{format_bytes(c['bytes_each']):>11} = {format_bytes(c['bytes']):>11}"
                     f"   ~{_time(c['time_s'])}")
    small = sum(1 for c in p["collectives"] if c["bytes"] < 1024)
    if small:
        lines.append(f"  (+{small} under 1 KiB: scalars such as the loss and grad norm)")
    for axis, b in p["collective_bytes_per_step_by_axis"].items():
        lines.append(f"  total over {axis:<12}{format_bytes(b):>12}")
    lines += ["", "roofline (per chip)",
              f"  compute       ~{_time(road['compute_s'])}",
              f"  memory        ~{_time(road['memory_s'])}",
              f"  kernels       ~{_time(road['busy_s'])} (per-kernel max of the two, summed)",
              f"  communication ~{_time(road['comm_s'])} ({_time(road['exposed_comm_s'])} exposed)",
              f"  overlap       {road['overlap']}",
              f"  step time     ~{_time(p['step_time_s_estimate'])}  (bounds "
              f"{_time(road['lower_bound_s'])} .. {_time(road['upper_bound_s'])}; "
              f"{road['bound']}-bound)",
              f"  tokens/s      ~{p['tokens_per_s_estimate']:,.0f}",
              f"  MFU           ~{p['mfu_estimate'] * 100:.1f}%", ""]
    lines += [f"note: {n}" for n in p.get("estimate_notes", [])]
    return "\n".join(lines)


def format_sweep(plans: list[dict]) -> str:
    head = f"{'#':>2}  {'mesh':<26}{'remat':<10}{'accum':>5}  {'memory/chip':>12}  " \
           f"{'step':>11}  {'tokens/s':>12}  {'MFU':>6}  source"
    lines = [head]
    for i, p in enumerate(plans, 1):
        m = p["model"]
        lines.append(f"{i:>2}  {_mesh(p['mesh']):<26}{m['remat']:<10}{m['grad_accum']:>5}  "
                     f"{format_bytes(p['memory_per_chip_bytes']['total']):>12}  "
                     f"{_time(p['step_time_s_estimate']):>11}  "
                     f"{p['tokens_per_s_estimate']:>12,.0f}  {p['mfu_estimate'] * 100:>5.1f}%  "
                     f"{p['source']}")
    return "\n".join(lines + ["(ranked by estimated step time among the candidates that fit; "
                              "every step time is a roofline estimate)"])
