"""What `kvmsplit series` says and writes: one summary (new failures with
their kernel report titles, fixed ones, changed split behaviour, phase-time
changes judged against repeat spread, and the first bad patch), an HTML
report of the patched run headed by that summary, a KCIDB fragment whose
checkout carries the series' message-id and patchset hash, and series.json."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

from kvmsplit.report.html import html_report
from kvmsplit.report.kcidb import kcidb_fragment
from kvmsplit.report.outputs import write_atomic
from kvmsplit.runs.compare import format_comparison
from kvmsplit.runs.digest import headline, results_source
from kvmsplit.series.pipeline import Outcome, Step, combo_label


def _step(o: Outcome, append: str | None, k: int) -> Step:
    return next(s for s in reversed(o.steps) if s.append == append and s.k == k and "-bisect" not in s.out.name)


def summary(o: Outcome) -> str:
    s = o.series
    n = len(s.patches)
    out = [f"series: {s.name}" + (f" v{s.version}" if s.version else "") + f" ({n} patch(es))",
           f"  message-id {s.message_id or '-'}, base {s.base_commit or 'the tree HEAD'}, "
           f"patchset hash {s.patchset_hash[:16]}"]
    for append, c in o.comparisons:
        base, top = _step(o, append, 0), _step(o, append, n)
        out += ["", f"== {combo_label(append)}" + (f" (--append {append!r})" if append else "")
                + f": base {base.image.key} vs patched {top.image.key}",
                format_comparison(c, str(base.out / "results.json"), str(top.out / "results.json"),
                                  results_source(top.out / "results.json"))]
        if c.new_failures:
            titles = sorted({headline(sb) for sb, _ in c.new_failures})
            out.append("kernel reports: " + "; ".join(titles))
        if append in o.first_bad and o.first_bad[append]:
            out.append(f"first bad: {s.label(o.first_bad[append] or 0)}")
    verdict = "introduces new failures" if o.worse else "introduces nothing new"
    out += ["", f"the series {verdict}"]
    return "\n".join(out)


def kcidb(o: Outcome) -> dict:
    """The patched run's fragment, its checkout naming the series as KCIDB asks."""
    top = _step(o, o.comparisons[0][0], len(o.series.patches))
    frag = kcidb_fragment(top.rr, results_source(top.out / "results.json"))
    for c in frag.get("checkouts", []):
        c["patchset_hash"] = o.series.patchset_hash
        c["patchset_files"] = [{"name": p.name, "url": p.resolve().as_uri()} for p in o.series.patches]
        if o.series.message_id and "@" in o.series.message_id:
            c["message_id"] = o.series.message_id.strip("<>")
        if o.series.base_commit and len(o.series.base_commit) == 40:
            c["git_commit_hash"] = o.series.base_commit
    return frag


def write(o: Outcome, out: Path, text: str) -> list[Path]:
    top = _step(o, o.comparisons[0][0], len(o.series.patches))
    page = html_report(top.rr, results_source(top.out / "results.json"))
    head = f'<h2>Series</h2><pre class="series-summary">{escape(text)}</pre>'
    page = page.replace("<h2>Summary</h2>", head + "<h2>Summary</h2>", 1)
    data = {"series": o.series.to_dict(), "introduces_failures": o.worse,
            "combinations": [{"append": a, "new_failures": [{"name": sb.name, "title": headline(sb),
                                                             "was": str(was) if was else None}
                                                            for sb, was in c.new_failures],
                              "fixed": [sb.name for _, sb in c.fixed],
                              "split_changes": [sb.name for _, sb in c.split_changes],
                              "phase_regressions": [f"{p.scenario} {p.phase}" for p in c.regressions],
                              "first_bad_patch": o.first_bad.get(a)}
                             for a, c in o.comparisons],
            "runs": [{"k": s.k, "append": s.append, "image": str(s.image.image), "key": s.image.key,
                      "results": str(s.out / "results.json")} for s in o.steps]}
    files = {out / "series.html": page, out / "kcidb.json": json.dumps(kcidb(o), indent=1) + "\n",
             out / "series.json": json.dumps(data, indent=1) + "\n", out / "summary.txt": text + "\n"}
    for path, body in files.items():
        write_atomic(path, body)
    return list(files)
