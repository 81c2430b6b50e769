"""A real MCP server built with the official Python SDK (`mcp`), for the integration tests.

Every tool invocation is appended to --calls, so a test can prove that a denied call never
reached the server.
"""

import argparse

import anyio

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventMessage, EventStore

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
parser.add_argument(
    "--resumable",
    action="store_true",
    help="keep stream events for resumption (Last-Event-ID) and offer read_polled, which closes "
    "its POST's stream at once (SSE polling): the answer comes on the client's resumed GET",
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


class MemoryEventStore(EventStore):
    """Every stream's events, in memory, replayed after the id a client last saw."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    async def store_event(self, stream_id, message):
        event_id = str(len(self.events) + 1)
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        ids = [e[0] for e in self.events]
        if last_event_id not in ids:
            return None
        stream_id = self.events[ids.index(last_event_id)][1]
        for event_id, sid, message in self.events[ids.index(last_event_id) + 1 :]:
            if sid == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


async def read_polled(name: str, ctx: Context) -> str:
    """Read a note; the POST's stream is closed first, the answer comes on the resumed one."""
    record("read_polled")
    await ctx.close_sse_stream()
    await anyio.sleep(0.5)
    return f"polled {name}"


run_options = {}
if args.resumable:
    server.tool()(read_polled)
    run_options = {"event_store": MemoryEventStore(), "retry_interval": 100}


@server.resource("notes://{name}")
def note(name: str) -> str:
    """A note, to read or subscribe to."""
    return "note " + name


@server.prompt()
def summary() -> str:
    """Summarise the notes."""
    return "Summarise the notes."


server.run(transport=args.transport, host=args.host, port=args.port, **run_options)
