"""The multi-host report as a picture: bytes per link, and the requests of each phase."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

from deploy.multihost.scenario import Report


def plot_report(report: Report, path: Path) -> None:
    fig, (links, phases) = plt.subplots(1, 2, figsize=(12, 4.5))
    traffic = report.relay_traffic
    groups = {
        "sent by\nprefill hosts": sum(t["tx_bytes"] for h, t in traffic.items()
                                       if h.startswith("prefill")),
        "received by\ndecode hosts": sum(t["rx_bytes"] for h, t in traffic.items()
                                          if h.startswith("decode")),
        "gateway link\n(both ways)": sum(t["rx_bytes"] + t["tx_bytes"]
                                          for h, t in traffic.items() if h == "gateway"),
    }
    megabytes = [v / 1e6 for v in groups.values()]
    bars = links.bar(list(groups), megabytes, color=["tab:orange", "tab:blue", "tab:gray"])
    links.bar_label(bars, labels=[f"{v:.2f} MB" for v in megabytes])
    links.axhline(report.relay_kv_bytes / 1e6, color="black", linestyle="--",
                  label="KV of every prompt token")
    links.set_ylabel("MB (interface counters)")
    links.set_title("relay phase: KV goes prefill -> decode, not via the gateway")
    links.set_ylim(0, max([*megabytes, report.relay_kv_bytes / 1e6]) * 1.15)
    links.legend(loc="center right")

    names = list(report.phases)
    ok = [report.phases[n].ok for n in names]
    failed = [report.phases[n].summary.get("failed", 0) for n in names]
    unfinished = [report.phases[n].summary.get("unfinished", 0) for n in names]
    phases.bar(names, ok, label="answered", color="tab:green")
    phases.bar(names, failed, bottom=ok, label="error", color="tab:red")
    phases.bar(names, unfinished, bottom=[a + b for a, b in zip(ok, failed, strict=True)],
               label="unfinished", color="tab:gray")
    phases.set_ylabel("requests")
    phases.set_title("cut: prefill-1 unplugged; kill: decode-0 killed mid-stream")
    phases.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
