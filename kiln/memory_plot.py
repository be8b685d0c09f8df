"""``kiln explain --memory PLOT.png``: what the tier plan does, in words and in a picture.

The picture re-simulates the cache schedule: the top panel is each tier's occupancy per step
(the device's fixed part — arena, activations, inputs — and the weights visiting it, against
the budget); the bottom panel is the timeline of the compute stream and the copies."""
from __future__ import annotations


def _mib(n: float) -> str:
    from kiln.passes.tiers import fmt_bytes
    return fmt_bytes(n)


def describe(schedule) -> str:
    s = schedule.sim
    homes = {}
    for sl in schedule.slots:
        homes.setdefault(sl.home, set()).add(sl.item)
    lines = [f"planner {schedule.planner}, device {schedule.device}, budget {_mib(schedule.budget)}: "
             f"device peak {_mib(s['device_peak'])} (pool {_mib(schedule.pool_bytes)} + fixed "
             f"{_mib(max(schedule.fixed_bytes, default=0))})",
             f"homes: host {_mib(s['peak']['host'])} ({len(homes.get('host', ()))} weights), "
             f"disk {_mib(s['peak']['disk'])} ({len(homes.get('disk', ()))} weights); kept on the device "
             f"for good {_mib(s['warmup_bytes'])}",
             f"per call: {_mib(s['transfer_bytes'])} moved, simulated {s['time_s'] * 1e3:.3f} ms "
             f"(compute {s['compute_s'] * 1e3:.3f} ms, stalls {s['stall_s'] * 1e3:.3f} ms)"]
    spills = getattr(schedule, "spills", ())
    if spills:
        lines.append(f"outputs handed to the host after their last read: {len(spills)} "
                     f"({_mib(sum(nb for _, _, nb, _ in spills))}; host total includes them)")
    return "\n".join(lines)


def draw(schedule, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--memory needs matplotlib: pip install 'kiln[bench]' (or matplotlib)") from None
    import numpy as np

    from kiln.passes.cache_schedule import waits_for
    from kiln.passes.simulate import simulate
    from kiln.passes.tiers import occupancy
    problem, plan, tiers = schedule.problem_and_plan()
    waits = waits_for(plan, [sl.offset for sl in schedule.slots], [sl.nbytes for sl in schedule.slots])
    res = simulate(problem, plan, tiers, waits=waits)
    steps = np.arange(problem.n_steps)
    fixed = np.asarray(problem.fixed_bytes, dtype=float)
    items = occupancy(problem, plan).astype(float)
    fig, (top, bot) = plt.subplots(2, 1, figsize=(11, 7), gridspec_kw={"height_ratios": [3, 2]})
    top.stackplot(steps, fixed / 2**20, items / 2**20, labels=["device: arena, activations, inputs",
                                                               "device: weights visiting"], alpha=0.8)
    top.axhline(schedule.budget / 2**20, color="red", ls="--", label="memory_budget")
    top.axhline((max(fixed, default=0) + schedule.pool_bytes) / 2**20, color="black", ls=":",
                label="device tier (fixed peak + pool)")
    for tier, color in (("host", "tab:green"), ("disk", "tab:brown")):
        if res.peak[tier]:
            top.plot(steps, np.full(len(steps), res.peak[tier] / 2**20), color=color, label=f"{tier} tier")
    top.set_xlabel("step")
    top.set_ylabel("MiB")
    top.set_title(f"tier occupancy ({schedule.planner} planner)")
    top.legend(fontsize=8, loc="upper right")
    ms = 1e3
    bot.broken_barh([(a * ms, (b - a) * ms) for a, b in zip(res.step_start, res.step_end)], (2, 0.8),
                    color="tab:blue", edgecolor="white", linewidth=0.3)
    colors = {"host": "tab:green", "disk": "tab:brown"}
    for t in res.transfers:
        row = 1 if t["kind"] == "load" else 0
        bot.broken_barh([(t["start"] * ms, (t["end"] - t["start"]) * ms)], (row, 0.8),
                        color=colors.get(t["tier"], "tab:gray"), alpha=0.8)
    bot.set_yticks([0.4, 1.4, 2.4], ["write-back", "loads", "compute"])
    bot.set_xlabel("simulated ms")
    bot.set_title(f"one call: {res.time_s * ms:.3f} ms, {res.transfer_bytes / 2**20:.1f} MiB moved, "
                  f"stalls {res.stall_s * ms:.3f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
