"""An unmodified MCP client built with the official Python SDK (`mcp`), for the tests.

Lists tools, calls each --call NAME=JSON_ARGS, and prints one JSON object with what happened.
"""

import argparse
import asyncio
import json
import os

from mcp import Client
from mcp.client.sse import sse_client
from mcp.shared.exceptions import MCPError

parser = argparse.ArgumentParser()
parser.add_argument("--url", required=True)
parser.add_argument("--transport", choices=["streamable-http", "sse"], required=True)
parser.add_argument("--mode", default="legacy", help="legacy (initialize handshake) or auto/2026-07-28")
parser.add_argument("--call", action="append", default=[], help="NAME=JSON arguments")
args = parser.parse_args()


async def main() -> dict:
    out: dict = {"pid": os.getpid(), "calls": {}}
    server = sse_client(args.url) if args.transport == "sse" else args.url
    async with Client(server, mode=args.mode) as client:
        tools = await client.list_tools()
        out["tools"] = sorted(t.name for t in tools.tools)
        for spec in args.call:
            name, _, raw = spec.partition("=")
            arguments = json.loads(raw) if raw else {}
            try:
                result = await client.call_tool(name, arguments)
                text = " ".join(getattr(c, "text", "") for c in result.content)
                out["calls"][name] = {"ok": not result.is_error, "text": text}
            except MCPError as e:
                out["calls"][name] = {"ok": False, "code": e.code, "message": e.message}
    return out


def leaf(e: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


try:
    print(json.dumps(asyncio.run(main())), flush=True)
except Exception as e:  # report, do not hide: the test prints it
    cause = leaf(e)
    print(json.dumps({"pid": os.getpid(), "fatal": f"{type(cause).__name__}: {cause}"}), flush=True)
    raise SystemExit(1)
