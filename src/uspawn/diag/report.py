"""Verdict rows shared by `doctor` and `check`: ok / degraded / broken, printed as a
table (container text escaped) or as JSON, with the exit code they imply."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

OK, DEGRADED, BROKEN = "ok", "degraded", "broken"
Row = dict[str, str]


def row(name: str, verdict: str, meaning: str, fix: str = "", detail: str = "") -> Row:
    return {"name": name, "verdict": verdict, "meaning": meaning, "fix": fix, "detail": detail}


def report(rows: list[Row], as_json: bool, out: TextIO, head: dict[str, str]) -> int:
    """Write rows as JSON ({**head, checks, summary}) or as a table; return the
    exit code: 1 when a row is broken, else 0."""
    counts = {v: sum(1 for r in rows if r["verdict"] == v) for v in (OK, DEGRADED, BROKEN)}
    code = 1 if counts[BROKEN] else 0
    if as_json:
        import json

        doc: dict[str, object] = {**head, "checks": rows,
                                  "summary": {**counts, "exit_code": code}}
        out.write(json.dumps(doc, indent=2) + "\n")
        return code
    import textwrap

    from uspawn.base.textsafe import printable

    # `check` rows quote the tree (file names, os-release PRETTY_NAME): escaped
    # through the one sanitiser before they reach a terminal.
    for key, value in head.items():
        out.write(f"{key}: {printable(str(value))}\n")
    w_name = max([5] + [len(r["name"]) for r in rows])
    indent = w_name + 12
    text_w = max(40, 110 - indent)
    out.write(f"{'CHECK':<{w_name}}  VERDICT   WHAT IT MEANS FOR CONTAINERS\n")
    for r in rows:
        lines = textwrap.wrap(printable(r["meaning"]), text_w, break_on_hyphens=False) or [""]
        if r["fix"] and r["verdict"] != OK:
            lines += textwrap.wrap("fix: " + printable(r["fix"]), text_w,
                                   subsequent_indent="     ", break_on_hyphens=False)
        out.write(f"{r['name']:<{w_name}}  {r['verdict']:<8}  {lines[0]}\n")
        out.writelines(" " * indent + line + "\n" for line in lines[1:])
    out.write(f"\n{counts[OK]} ok, {counts[DEGRADED]} degraded, {counts[BROKEN]} broken"
              + (": containers will NOT work as they are\n" if code else "\n"))
    return code
