"""The client commands: `sluicegate submit | tail | quota | weight | stats`, over the HTTP API
(sluicegate/client/), for operators and scripts. They talk to `--url` (env SLUICEGATE_URL) with
`--api-key` (env SLUICEGATE_API_KEY); human output by default, `--json` for one JSON document per line.

Kept apart from the server commands: they take no server settings (`--group` here is a submit's
field, not a worker's), and they import httpx and rich only when they run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluicegate.client import Client, Event, SluicegateError

COMMANDS = ("submit", "tail", "quota", "weight", "stats")
QUOTA_FIELDS = ("requests_per_second", "tokens_per_second", "burst", "max_concurrency", "burst_tokens")
UNLIMITED = ("none", "null", "unlimited", "off")
NO_LIMIT = "none"  # a quota field given as one of UNLIMITED (None is a field not given)
WAIT_FOR_SESSION_SECONDS = 1.0  # `tail` of a session that does not exist yet asks again this often
MIN_INTERVAL_SECONDS = 0.1  # `stats --watch --interval`: less would poll the API as fast as it answers


def add_commands(sub: Any) -> None:
    """Register the client commands on the `sluicegate` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="the Sluicegate API [env SLUICEGATE_URL] "
                        "(default: http://127.0.0.1:8000)")
    common.add_argument("--api-key", default=None, help="sent as Authorization: Bearer (the admin key for "
                        "quota, weight and stats when auth is on) [env SLUICEGATE_API_KEY]")
    common.add_argument("--json", action="store_true", help="one JSON document per line instead of text")
    following = argparse.ArgumentParser(add_help=False)
    following.add_argument("--reconnect-timeout", type=float, default=300.0, metavar="S",
                           help="give up after S seconds without a connection (default: 300)")

    p = sub.add_parser("submit", parents=[common, following], help="queue a request in a session; prints its id",
                       description="Queue a request in SESSION and print its request id; with --follow, stream "
                                   "its text as it is generated (the id goes to stderr then), reconnecting and "
                                   "resuming by itself. Exit code 1 when the request fails or is cancelled.")
    p.add_argument("session", metavar="SESSION")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    p.add_argument("--priority", default=None, help="0..9 or low|normal|high|critical (default: 5)")
    p.add_argument("--tenant", default=None, help="the tenant (with auth on, the key's tenant wins)")
    p.add_argument("--group", default=None, help="the consumer group (default: default)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most (default: 256)")
    p.add_argument("--follow", "-f", action="store_true", help="stream the request's text until it ends")

    p = sub.add_parser("tail", parents=[common, following], help="follow a session's events (resumes by itself)",
                       description="Print SESSION's events as they happen, one per line, from the oldest kept "
                                   "(or after event id N); a dropped connection or a restarted API is resumed "
                                   "from the last event shown, none lost or twice. Ctrl-C stops.")
    p.add_argument("session", metavar="SESSION")
    p.add_argument("--after", type=int, default=None, metavar="N", help="start after event id N")

    p = sub.add_parser("quota", parents=[common], help="show or set a group's quota",
                       description="Set the quota fields given (none: show the group's quota). A value of "
                                   "'none' removes that limit (a burst goes back to its default: 1 request, "
                                   "one second of tokens/s); fields not given are kept.")
    p.add_argument("group", metavar="GROUP")
    for name in QUOTA_FIELDS:
        removed = "its default" if name.startswith("burst") else "unlimited"  # what none gives (scheduler/quota.py)
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="N", type=quota_value,
                       help=f"{name.replace('_', ' ')} (a number, or none: {removed})")

    p = sub.add_parser("weight", parents=[common], help="set a tenant's fair-share weight",
                       description="Set TENANT's fair-share weight (default 1.0; 3.0 gets three times the "
                                   "tokens of a 1.0 tenant when both are waiting).")
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("weight", metavar="W", type=finite_number)

    p = sub.add_parser("stats", parents=[common], help="queues, running requests, workers, quotas, tenants",
                       description="GET /v1/admin/stats as tables (or --json); --watch redraws it live.")
    p.add_argument("--watch", "-w", action="store_true", help="update in place until Ctrl-C")
    p.add_argument("--interval", type=interval_seconds, default=1.0, metavar="S",
                   help=f"seconds between updates, at least {MIN_INTERVAL_SECONDS:g} (default: 1)")


def run(args: argparse.Namespace) -> int:
    """Run one client command; a refused call is one line on stderr and exit code 1; input that cannot be
    sent (a URL that does not parse, text that is not valid Unicode, a number JSON cannot carry, an API key
    with a character no header can carry: a line end, a non-ASCII character, a space at either end) is one
    line and exit code 2. No line names the API key or the password of the URL's userinfo (the client's
    messages leave them out; httpx's InvalidURL, which may quote it, is not printed)."""
    import httpx

    from sluicegate.client import Client, InvalidArgument, SluicegateError

    url = args.url or os.environ.get("SLUICEGATE_URL") or None
    try:
        with Client(url, api_key=args.api_key or None) as client:
            return {"submit": submit, "tail": tail, "quota": quota, "weight": weight,
                    "stats": stats}[args.command](client, args)
    except InvalidArgument as error:  # a SluicegateError, but the caller's input: a usage error, not a refusal
        print(f"sluicegate {args.command}: cannot send this: {error.message}", file=sys.stderr)
        return 2
    except SluicegateError as error:
        fail(args, error)
        return 1
    except httpx.InvalidURL:  # its text quotes what it refused, which may be a password: not printed
        print(f"sluicegate {args.command}: cannot send this: a URL that does not parse", file=sys.stderr)
        return 2
    except ValueError as error:  # UnicodeError is a ValueError
        print(f"sluicegate {args.command}: cannot send this: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sluicegate tail S | head`: the reader is gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


def fail(args: argparse.Namespace, error: SluicegateError) -> None:
    status = error.status if error.status is not None else "no answer"
    print(f"sluicegate {args.command}: {status} {error.code}: {error.message}", file=sys.stderr)


def emit(document: Any) -> None:
    print(json.dumps(document, separators=(",", ":")), flush=True)


def notice(command: str) -> Any:
    """A reconnect callback: one line on stderr (stdout stays the stream's, text or JSON)."""

    def on_reconnect(error: Exception, wait: float) -> None:
        reason = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
        print(f"sluicegate {command}: connection lost ({reason}); reconnecting in {wait:.1f} s", file=sys.stderr,
              flush=True)

    return on_reconnect


# ---- submit / tail ---------------------------------------------------------------------------------
def submit(client: Client, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sent = client.submit(args.session, prompt, max_tokens=args.max_tokens, priority=args.priority,
                         tenant=args.tenant, group=args.group)
    if args.json:
        emit(sent.raw)
    elif args.follow:
        print(sent.request_id, file=sys.stderr, flush=True)
    else:
        print(sent.request_id, flush=True)
    if not args.follow:
        return 0
    last: Event | None = None
    for event in client.stream(request_id=sent.request_id, reconnect_timeout=args.reconnect_timeout,
                               on_reconnect=notice("submit")):
        last = event
        if args.json:
            emit(event.as_dict())
        elif event.event == "token":
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if not args.json:
        print(flush=True)
        if last is not None and last.event != "done":
            print(f"sluicegate submit: request {last.event}: {last.data.get('message', '')}".rstrip(": "),
                  file=sys.stderr)
    return 0 if last is not None and last.event == "done" else 1


def describe(event: Event) -> str:
    """One human line per event: id, name, request, then the event's own fields."""
    if event.event == "token":
        detail = f"#{event.index} {event.text!r}"
    else:
        detail = " ".join(f"{k}={v if isinstance(v, str | int | float) else json.dumps(v)}"
                          for k, v in event.data.items() if k != "request_id")
    return f"{event.id:>7} {event.event:<9} {event.request_id or '-'} {detail}".rstrip()


def tail(client: Client, args: argparse.Namespace) -> int:
    """Follow the session; one that does not exist yet (or any more) is waited for, as `tail -F` waits for
    a file, until its first event or Ctrl-C. One that expired after events were shown (idle for its TTL)
    is waited for too, then followed from the start of its next life: that life numbers its events from
    1 again, so every one of them is new. Any other refusal ends the command (exit 1)."""
    from sluicegate.client import SluicegateError

    after = args.after
    seen = told = False  # an event was shown in this life; its "waiting" line was printed
    while True:
        try:
            for event in client.stream(session_id=args.session, after=after,
                                       reconnect_timeout=args.reconnect_timeout, on_reconnect=notice("tail")):
                seen = True
                if args.json:
                    emit(event.as_dict())
                else:
                    print(describe(event), flush=True)
            return 0
        except SluicegateError as error:
            if not no_session_yet(error, args.session):
                raise
            if seen:  # it expired while followed: the next life starts over at event id 1
                after, seen, told = 0, False, True
                print(f"sluicegate tail: session {args.session!r} expired; waiting for it (Ctrl-C to stop)",
                      file=sys.stderr, flush=True)
            elif not told:
                told = True
                print(f"sluicegate tail: {error.message}; waiting for it (Ctrl-C to stop)", file=sys.stderr,
                      flush=True)
            time.sleep(WAIT_FOR_SESSION_SECONDS)


def no_session_yet(error: SluicegateError, session_id: str) -> bool:
    """Sluicegate's own 404 for a session with no event yet: a JSON error body whose message names the
    session (api/streaming.py: "no session 'ID' (never used, ...)"). Any other 404 (another server's page,
    a wrong route's "no such endpoint") would never turn into a stream: waiting for it would hang."""
    body = error.body.get("error") if isinstance(error.body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    return (error.status == 404 and error.code == "not_found" and isinstance(message, str)
            and message.startswith("no session ") and session_id in message)


# ---- quota / weight --------------------------------------------------------------------------------
def finite_number(text: str) -> float:
    """An argparse type: a number that JSON can carry (not nan or inf); a usage error (exit 2) otherwise."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number, not {text!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"a finite number, not {text!r}")
    return number


def interval_seconds(text: str) -> float:
    """An argparse type: seconds between `stats --watch` updates, at least MIN_INTERVAL_SECONDS (0 would
    poll without a pause, a negative one fail in time.sleep after the first update)."""
    number = finite_number(text)
    if number < MIN_INTERVAL_SECONDS:
        raise argparse.ArgumentTypeError(f"at least {MIN_INTERVAL_SECONDS:g} seconds, not {text!r}")
    return number


def quota_value(text: str) -> float | int | str:
    """An argparse type: a quota field's number, or NO_LIMIT (none: unlimited)."""
    if text.strip().lower() in UNLIMITED:
        return NO_LIMIT
    try:
        number = finite_number(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"a number or none, not {text!r}") from None
    return int(number) if number.is_integer() else number


def describe_quota(answer: dict[str, Any]) -> str:
    limits = answer.get("quota") or {}
    shown = " ".join(f"{k}={limits[k]}" for k in QUOTA_FIELDS if k in limits) or "unlimited"
    model = f" (model {answer['model']})" if answer.get("model") else ""
    return f"group {answer.get('group')}{model}: {shown}"


def quota(client: Client, args: argparse.Namespace) -> int:
    fields = {name: None if value == NO_LIMIT else value for name in QUOTA_FIELDS
              if (value := getattr(args, name)) is not None}
    if fields:
        answer = client.set_quota(args.group, **fields)
    else:
        answer = next((g for g in client.groups() if g.get("group") == args.group), None)
        if answer is None:
            print(f"sluicegate quota: no group {args.group!r}", file=sys.stderr)
            return 1
    if args.json:
        emit(answer)
    else:
        print(describe_quota(answer))
    return 0


def weight(client: Client, args: argparse.Namespace) -> int:
    answer = client.set_weight(args.tenant, args.weight)
    if args.json:
        emit(answer)
    else:
        print(f"tenant {answer.get('tenant', args.tenant)}: weight {answer.get('weight', args.weight)}")
    return 0


# ---- stats -----------------------------------------------------------------------------------------
def render_stats(data: dict[str, Any]) -> Any:
    """The stats as rich tables: totals, groups, queue depth, workers, tenants."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    workers = data.get("workers") or []
    title = Text(f"queued {data.get('queued', 0)}   running {data.get('running', 0)}   workers {len(workers)}   "
                 f"{time.strftime('%H:%M:%S')}", style="bold")
    groups = Table("group", "running", "free slots", "queued", "throttled", "quota", title="groups",
                   title_justify="left")
    by_group = data.get("queued_by_group") or {}
    for g in data.get("groups") or []:
        limits = g.get("quota") or {}
        throttled = (g.get("last_throttle_reason") or "yes") if g.get("throttled") else ""
        groups.add_row(str(g.get("group")), str(g.get("running", 0)), str(g.get("free_slots", 0)),
                       str(by_group.get(g.get("group"), 0)), str(throttled),
                       " ".join(f"{k}={v}" for k, v in limits.items()) or "unlimited")
    queue = Table("group", "priority", "tenant", "queued", title="queue depth", title_justify="left")
    for row in data.get("queue_depth") or []:
        queue.add_row(str(row.get("group")), str(row.get("priority")), str(row.get("tenant")), str(row.get("queued")))
    workers_table = Table("worker", "group", "engine", "slots", "host", "pid", title="workers", title_justify="left")
    for w in workers:
        workers_table.add_row(*(str(w.get(k, "")) for k in ("worker_id", "group", "engine", "slots", "host", "pid")))
    tenants = Table("tenant", "weight", "max priority", "max streams", "virtual tokens", title="tenants",
                    title_justify="left")
    for t in data.get("tenants") or []:
        counters = " ".join(f"{g}={v:g}" for g, v in (t.get("virtual_token_counter") or {}).items())
        tenants.add_row(str(t.get("tenant")), f"{t.get('weight', 1.0):g}", str(t.get("max_priority", "")),
                        "unlimited" if t.get("max_streams") is None else str(t.get("max_streams")), counters)
    parts: list[Any] = [title, groups]
    if data.get("queue_depth"):
        parts.append(queue)
    parts += [workers_table, tenants]
    return Group(*parts)


def stats(client: Client, args: argparse.Namespace) -> int:
    from rich.console import Console

    if not args.watch:
        if args.json:
            emit(client.stats())
        else:
            Console(width=None if sys.stdout.isatty() else 160).print(render_stats(client.stats()))
        return 0
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.json or not console.is_terminal:  # a log or a pipe: one snapshot after another, no redrawing
        while True:
            data = poll(client, args)
            if data is not None and args.json:
                emit(data)
            elif data is not None:
                console.print(render_stats(data))
                console.print()
                console.file.flush()
            time.sleep(args.interval)
    from rich.live import Live

    with Live(render_stats(client.stats()), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(args.interval)
            data = poll(client, args, live)
            if data is not None:
                live.update(render_stats(data))


def poll(client: Client, args: argparse.Namespace, live: Any = None) -> dict[str, Any] | None:
    """One watch update; an error (the API restarting) is shown and the watch goes on."""
    from sluicegate.client import SluicegateError

    try:
        return client.stats()
    except SluicegateError as error:
        if live is not None:
            from rich.text import Text

            live.update(Text(f"{time.strftime('%H:%M:%S')} {error}", style="red"))
        else:
            fail(args, error)
        return None
