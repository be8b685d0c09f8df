"""Render a bench JSON (bench/suite.py) as a bar chart PNG: per case, the speed-up over eager of
TorchInductor and kiln, with the roofline's speed-up (eager time / roofline time: the most any
compiler could get) as a marker. Failed runs are drawn as empty bars labelled "failed".

    python bench/chart.py results.json chart.png
"""
from __future__ import annotations

import json
import sys


def render(result: dict, path: str) -> str:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the bench chart needs matplotlib: pip install 'kiln[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    rows = result["rows"]
    labels = [r["case"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4.5))
    width = 0.38
    for i, (backend, color) in enumerate((("inductor", "#4c72b0"), ("kiln", "#dd8452"))):
        xs = [j + (i - 0.5) * width for j in range(len(rows))]
        ys = [r["eager_ms"] / r[f"{backend}_ms"] if f"{backend}_ms" in r else 0.0 for r in rows]
        bars = ax.bar(xs, ys, width, label="TorchInductor" if backend == "inductor" else "kiln", color=color)
        for b, y in zip(bars, ys):
            x = b.get_x() + b.get_width() / 2
            if y:
                ax.annotate(f"{y:.2f}x", (x, y), ha="center", va="bottom", fontsize=7)
            else:           # no bar on a log axis: say so at the bottom
                ax.text(x, 0.02, f"{backend}\nfailed", transform=blended_transform_factory(ax.transData, ax.transAxes),
                        ha="center", va="bottom", fontsize=7, color=color)
    roof = [r["eager_ms"] / r["roofline_ms"] if r.get("roofline_ms") else None for r in rows]
    ax.scatter([j for j, v in enumerate(roof) if v], [v for v in roof if v], marker="_", s=900, color="black",
               label="roofline", zorder=3)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, rotation=25, ha="right")
    ax.set_ylabel("speed-up over eager (log)")
    m = result.get("meta", {})
    gm = result.get("geomean", {})
    sub = "; ".join(f"{g} geomean: Inductor {v['inductor']:.2f}x, kiln {v['kiln']:.2f}x" for g, v in gm.items())
    ax.set_title(f"{m.get('device', '')}, torch {m.get('torch', '')}\n{sub}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python bench/chart.py RESULTS.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        render(json.load(f), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
