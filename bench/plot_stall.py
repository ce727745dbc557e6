"""Chart of bench/stall.py's JSON: stall and loop overhead per checkpoint, per saver (PNG).

pip install matplotlib
python bench/plot_stall.py bench/results/stall-cpu.json docs/stall-cpu.png
python bench/plot_stall.py --stall-only RESULTS.json OUT.png   # when the run's loop overhead is noise
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    argv = sys.argv[1:]
    stall_only = "--stall-only" in argv
    argv = [a for a in argv if a != "--stall-only"]
    if len(argv) != 2:
        sys.exit(__doc__)
    from matplotlib.figure import Figure

    data = json.load(open(argv[0]))
    savers = {k: v for k, v in data["savers"].items() if v.get("stall_s") is not None}
    names = list(savers)
    stall = [savers[n]["stall_s"] * 1e3 for n in names]
    floor = data["floor_s"] * 1e3
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    y = range(len(names))
    if stall_only:
        ax.barh(list(y), stall, height=0.6, label="stall (training thread blocked)")
    else:
        overhead = [max(savers[n]["overhead_s"], 0) * 1e3 for n in names]
        ax.barh([i + 0.2 for i in y], stall, height=0.4, label="stall (training thread blocked)")
        ax.barh([i - 0.2 for i in y], overhead, height=0.4, label="loop overhead (stall + background slowdown)")
        for i, n in enumerate(names):
            if savers[n]["overhead_s"] <= 0:  # a log axis cannot draw it; say so rather than show nothing
                ax.text(
                    min(stall) / 2,
                    i - 0.2,
                    f"loop overhead {savers[n]['overhead_s'] * 1e3:.0f} ms: within the noise",
                    va="center",
                    fontsize=8,
                )
    ax.axvline(floor, color="k", linestyle=":", label=f"bare copy floor ({floor:.0f} ms)")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(left=min(stall) / 2)
    ax.set_xlabel("ms per checkpoint (log scale, median)")
    m = data["machine"]
    ax.set_title(
        f"{data['state_bytes'] / 1e9:.2f} GB state, {m.get('gpu', 'CPU')} / {m['cores']} cores, "
        f"torch {m['torch']}, {m['date']}"
    )
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    fig.savefig(argv[1], dpi=110)
    print(f"wrote {argv[1]}")


if __name__ == "__main__":
    main()
