#!/usr/bin/env python3
"""WebSocket conformance: the Autobahn|Testsuite cases against a running gateway.

    autobahn.py <gateway client URL, e.g. http://127.0.0.1:8080> <expectations.json>
                [--outdir DIR] [--print]

kosoku (PyPI) replays the Autobahn|Testsuite fuzzing client's cases. The cases expect a
server that answers on any path and says nothing first, so a small proxy on loopback
stands between them and the gateway, and changes only that: it mints a dev-mode token
for a fresh user per connection (`POST /dev/token`: the gateway must run in dev mode),
rewrites the request line to `GET /ws?token=…`, and drops the gateway's first frame
(the `welcome`, checked to be one). Every other byte passes unchanged in both
directions, and a reset on one side resets the other, so closes and drops are the
gateway's own.

Each case's result is compared with the expectations file: by default the behaviour must
be OK, NON-STRICT or INFORMATIONAL and the close OK or INFORMATIONAL (the close
handshake completed with the right code: 1002 for protocol errors, 1007 for invalid
UTF-8, ...); the file lists each case that differs, with the results it must have and
why. A case whose results differ from what is expected fails the run (exit status 1),
and so does an expectation that names no case of the suite. `--print` prints every
case's results as an expectations file would hold them, to review a new version.
"""

import argparse
import asyncio
import fnmatch
import itertools
import json
import sys
import urllib.request

import kosoku

DEFAULT_BEHAVIOR = {"OK", "NON-STRICT", "INFORMATIONAL"}
DEFAULT_CLOSE = {"OK", "INFORMATIONAL"}


def mint_token(base, user):
    request = urllib.request.Request(
        f"{base}/dev/token", data=json.dumps({"user": user}).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["token"]


async def read_frame(reader):
    """One whole frame as the server sent it (servers do not mask)."""
    header = await reader.readexactly(2)
    length = header[1] & 0x7F
    extra = b""
    if length == 126:
        extra = await reader.readexactly(2)
        length = int.from_bytes(extra, "big")
    elif length == 127:
        extra = await reader.readexactly(8)
        length = int.from_bytes(extra, "big")
    payload = await reader.readexactly(length)
    return header[0], payload


async def pipe(reader, writer, other):
    """Copies until EOF (then half-closes) or a reset (then resets the other side)."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:  # reset, broken pipe, or the other side already gone
        writer.transport.abort()
        other.transport.abort()


class Proxy:
    def __init__(self, base):
        self.base = base
        self.host, self.port = base.removeprefix("http://").rsplit(":", 1)
        self.users = itertools.count()
        self.problems = []
        self.tasks = set()

    async def handle(self, client_reader, client_writer):
        self.tasks.add(asyncio.current_task())
        try:
            await self.relay(client_reader, client_writer)
        except (asyncio.IncompleteReadError, OSError) as e:
            client_writer.transport.abort()
            self.problems.append(f"proxy: {e!r}")
        except asyncio.CancelledError:
            pass  # the run is over: kosoku has closed or dropped its side
        finally:
            client_writer.close()

    async def relay(self, client_reader, client_writer):
        head = await client_reader.readuntil(b"\r\n\r\n")
        user = f"autobahn-{next(self.users)}"
        token = await asyncio.to_thread(mint_token, self.base, user)
        _, rest = head.split(b"\r\n", 1)
        head = f"GET /ws?token={token}&device=autobahn HTTP/1.1\r\n".encode() + rest
        server_reader, server_writer = await asyncio.open_connection(self.host, int(self.port))
        server_writer.write(head)
        response = await server_reader.readuntil(b"\r\n\r\n")
        client_writer.write(response)
        if response.startswith(b"HTTP/1.1 101"):
            opcode, payload = await read_frame(server_reader)
            if opcode != 0x81 or not payload.startswith(b'{"type":"welcome"'):
                self.problems.append(f"the first frame was not a welcome: {payload[:80]!r}")
        await asyncio.gather(
            pipe(client_reader, server_writer, client_writer),
            pipe(server_reader, client_writer, server_writer),
        )
        server_writer.close()


def answered_with_errors(received):
    """At least one message received, and every one a JSON `error` frame (pongs aside)."""
    messages = [event for event in received if event[0] == "message"]
    return bool(messages) and all(
        str(event[1]).startswith('{"type":"error"') for event in messages
    )


def matches(expectation, case_id):
    return any(fnmatch.fnmatchcase(case_id, c) for c in expectation["cases"])


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gateway", help="the gateway's client URL, http://host:port")
    parser.add_argument("expectations", help="the expectations file (JSON)")
    parser.add_argument("--outdir", help="also write kosoku's HTML and JSON reports here")
    parser.add_argument("--print", action="store_true", help="print every case's results")
    parser.add_argument("--parallelism", type=int, default=4)
    parser.add_argument("--include", action="append", help="run only these cases (globs)")
    args = parser.parse_args()
    with open(args.expectations) as f:
        spec = json.load(f)

    proxy = Proxy(args.gateway.rstrip("/"))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        results = await kosoku.run_fuzzingclient(
            f"ws://127.0.0.1:{port}",
            args.include,
            spec.get("excluded", []),
            concurrency=args.parallelism,
        )
    except kosoku.FailureError as failure:
        # Some cases did not pass: expected (the echo cases); compared below.
        results = failure.results
    server.close()
    for task in proxy.tasks:
        task.cancel()
    await asyncio.gather(*proxy.tasks, return_exceptions=True)
    if args.outdir:
        from kosoku._report import write_reports

        write_reports(results, args.outdir)

    wrong, counts = [], {}
    for r in results:
        got = (r.behavior.value, r.behavior_close.value)
        counts[got] = counts.get(got, 0) + 1
        special = [e for e in spec["cases"] if matches(e, r.case_id)]
        expected = special[0] if special else {}
        behavior = set(expected.get("behavior", DEFAULT_BEHAVIOR))
        close = set(expected.get("close", DEFAULT_CLOSE))
        if args.print:
            print(
                f"{r.case_id}: {got[0]} / close {got[1]}"
                f" (remote close {r.remote_close_code}, local {r.local_close_code})"
            )
        problem = None
        if got[0] not in behavior or got[1] not in close:
            problem = f"expected {sorted(behavior)} / close {sorted(close)}"
        elif "remote_close" in expected and r.remote_close_code not in expected["remote_close"]:
            problem = f"expected the gateway to close with {expected['remote_close']}"
        elif expected.get("received_errors") and not answered_with_errors(r.received):
            problem = f"expected JSON error frames, received {str(r.received)[:200]}"
        if problem:
            wrong.append(
                f"{r.case_id}: {got[0]} / close {got[1]}, {problem} (remote close code"
                f" {r.remote_close_code}; {r.description.strip()[:100]!r})"
            )
    ids = [r.case_id for r in results]
    for e in spec["cases"] if not args.include else []:
        if not any(matches(e, i) for i in ids):
            wrong.append(f"an expectation names no case: {e['cases']}")

    summary = ", ".join(f"{n} {b}/{c}" for (b, c), n in sorted(counts.items()))
    print(f"autobahn: {len(results)} cases (behaviour/close): {summary}")
    for p in sorted(set(proxy.problems)):
        print(f"autobahn: {p}", file=sys.stderr)
    if any("welcome" in p for p in proxy.problems):
        wrong.append("the proxy saw a first frame that was not a welcome")
    if wrong:
        print("autobahn: results that differ from the expectations:", file=sys.stderr)
        for w in wrong:
            print(f"  {w}", file=sys.stderr)
        sys.exit(1)
    print("autobahn: every case as expected")


if __name__ == "__main__":
    asyncio.run(main())
