"""A human summary of one run, from the small results each stage recorded."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipeline.context import RunContext
from pipeline.release import format as release
from pipeline.stages import STAGES

_ORDER = ("ndcg", "recall", "map", "precision", "hit_rate", "coverage", "diversity", "novelty")


def print_summary(ctx: RunContext, curl_examples: bool = False, console: Console | None = None) -> bool:
    console = console or Console(width=max(Console().width, 110))
    res = {name: ctx.read_result(name) for name in STAGES}
    if res["extract"] is None:
        console.print(f"[red]no run found for tenant {ctx.tenant} at {ctx.run_id}[/red]")
        return False
    console.rule(f"tenant {ctx.tenant} · run {ctx.run_id} (data before {ctx.interval_end.isoformat()})")
    data = Table(title="data per stage")
    for col in ("stage", "rows", "users", "items", "notes"):
        data.add_column(col, justify="right" if col in ("rows", "users", "items") else "left")
    e = res["extract"]
    data.add_row(
        "extract",
        f"{e['rows']:,}",
        f"{e['users']:,}",
        f"{e['items']:,}",
        f"{e['files']} file(s), {e['dropped_after_interval_end']} after interval end dropped",
    )
    if v := res["validate"]:
        data.add_row(
            "validate",
            "",
            "",
            "",
            f"{v['evaluated'] - v['failed']}/{v['evaluated']} expectations passed, "
            f"{v['duplicate_rows']} duplicate rows",
        )
    if f := res["features"]:
        data.add_row(
            "features",
            f"{f['events']:,}",
            f"{f['users']:,}",
            f"{f['items']:,}",
            f"train {f['train_events']:,} / holdout {f['holdout_events']:,}; {f['holdout_users']} users evaluated",
        )
    for stage in ("train", "refit"):
        if t := res[stage]:
            data.add_row(
                stage,
                f"{t['events']:,}",
                "",
                "",
                f"{t['kind']} · {t['iterations']} it · {t['seconds']}s on {t['device']}",
            )
    console.print(data)
    _print_costs(console, res)
    if ev := res["evaluate"]:
        table = Table(title=f"holdout metrics ({ev['users']} users, full ranking)")
        first = next(iter(ev["metrics"].values()))
        names = sorted(
            (n for n in first if n != "users"),
            key=lambda n: (_ORDER.index(n.split("@")[0]) if n.split("@")[0] in _ORDER else len(_ORDER), n),
        )
        table.add_column("model")
        for n in names:
            table.add_column(n, justify="right", no_wrap=True)
        for model, vals in ev["metrics"].items():
            table.add_row(model, *(f"{vals[n]:.4f}" if vals.get(n) is not None else "-" for n in names))
        console.print(table)
    if g := res["gate"]:
        colour = "green" if g["publish"] else "yellow"
        console.print(
            f"[bold]gate:[/bold] [{colour}]{'PUBLISH' if g['publish'] else 'REJECT'}[/{colour}] {g['reason']}"
        )
    if p := res["publish"]:
        console.print(f"[bold]release:[/bold] {p['release_id']} ({p['pointer_reason']})")
    if r := res["refresh"]:
        console.print(
            f"[bold]refresh:[/bold] {r['store']}"
            + (
                f", {r['users']} users, pointer {'flipped' if r['flipped'] else 'unchanged'}"
                if r["store"] == "redis"
                else ""
            )
        )
    if curl_examples:
        pointer = release.read_pointer(ctx.store, ctx.tenant)
        if pointer:
            live = release.load_release(ctx.store, ctx.tenant, pointer[0]["release_id"])
            user, item = live.user_ids[0], live.item_ids[int(live.popular[0])]
            base = "http://127.0.0.1:8000/v1/tenants/" + ctx.tenant
            console.print("\nTry the API (started next):")
            console.print(f"  curl -s '{base}/users/{user}/recommendations?k=5'")
            console.print(f"  curl -s '{base}/items/{item}/similar?k=5'")
    return True


def _print_costs(console: Console, res: dict) -> None:
    """What each stage cost (recorded by pipeline.stages.run_stage, see pipeline/ops/cost.py)."""
    spent = {s: r["cost"] for s, r in res.items() if r and isinstance(r.get("cost"), dict)}
    if not spent:
        return
    table = Table(title="cost per stage")
    for col in ("stage", "CPU s", "wall s", "peak RSS MB"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, c in spent.items():
        table.add_row(stage, f"{c['cpu_s']:.2f}", f"{c['wall_s']:.2f}", f"{c['peak_rss_mb']:,.1f}")
    table.add_row(
        "total",
        f"{sum(c['cpu_s'] for c in spent.values()):.2f}",
        f"{sum(c['wall_s'] for c in spent.values()):.2f}",
        f"{max(c['peak_rss_mb'] for c in spent.values()):,.1f} (max)",
    )
    console.print(table)
