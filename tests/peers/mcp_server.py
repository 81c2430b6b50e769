"""A real MCP server built with the official Python SDK (`mcp`), for the integration tests.

Every tool invocation is appended to --calls, so a test can prove that a denied call never
reached the server.
"""

import argparse

import anyio

from mcp.server.mcpserver import MCPServer

parser = argparse.ArgumentParser()
parser.add_argument("--transport", choices=["streamable-http", "sse"], required=True)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--calls", required=True, help="file that records each tool call")
parser.add_argument(
    "--with-slow-tool",
    action="store_true",
    help="also offer read_slowly, which answers after a given number of seconds",
)
args = parser.parse_args()

server = MCPServer("notes")


def record(name: str) -> None:
    with open(args.calls, "a", encoding="utf-8") as f:
        f.write(name + "\n")


@server.tool()
def read_note(name: str) -> str:
    """Read a note."""
    record("read_note")
    return f"contents of {name}"


@server.tool()
def search(query: str) -> str:
    """Search the notes."""
    record("search")
    return f"results for {query}"


@server.tool()
def delete_note(name: str) -> str:
    """Delete a note."""
    record("delete_note")
    return f"deleted {name}"


@server.tool()
def write_note(name: str, text: str) -> str:
    """Write a note."""
    record("write_note")
    return f"wrote {name}"


async def read_slowly(name: str, seconds: float) -> str:
    """Read a note, slowly (a call still in flight when a test cuts it off)."""
    record("read_slowly")
    await anyio.sleep(seconds)
    return f"contents of {name}"


if args.with_slow_tool:
    server.tool()(read_slowly)


@server.resource("notes://{name}")
def note(name: str) -> str:
    """A note, to read or subscribe to."""
    return "note " + name


@server.prompt()
def summary() -> str:
    """Summarise the notes."""
    return "Summarise the notes."


server.run(transport=args.transport, host=args.host, port=args.port)
