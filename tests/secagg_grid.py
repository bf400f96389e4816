"""An in-memory Flower `Grid` on which the real coordinator talks to the real node handlers.

`SecAggGrid` implements the part of flwr 1.42's `Grid` that `server.messaging.exchange`
and `server.secure_aggregation.secure_sum` use (`send_and_receive`, `push_messages`,
`pull_messages`, `get_node_ids`, plus the rest of the abstract interface), and delivers
every `query.secagg_*` message to `client.secure_aggregation.handle_stage` with the stage
name after "query." (so stages added later are routed without changes here). It does
what the SuperLink and the SuperNodes do for such a message:

- it stamps a fresh message id on each pushed message (the caller's object too, as
  Flower's grids do) and refuses, like the LinkState, a message whose source is not the
  SuperLink, whose run differs, that is a reply, or whose destination is unknown;
- each node has one flwr `Context` (`contexts[node_id]`) that persists across messages;
  the context and every message cross a Flower serialisation round trip
  (`context_to_proto`, `message_to_proto`), so only what survives Flower's wire arrives;
- a handler that raises becomes an error reply (`Error(CLIENT_APP_RAISED_EXCEPTION,
  "<class '...'>:<'...'>")`) like Flower's ClientApp runtime; the node's context keeps
  what the handler changed before raising (the deployed runtime pushes it back; the
  simulation engine drops it: pass `keep_state_on_error=False` to play that);
- the reply is built with `Message(content, reply_to=request)`, so its metadata
  (`reply_to_message_id`, `src_node_id`, `dst_node_id`) is Flower's own.

Hooks a test sets before running the coordinator:
- `drop(node_id, stage, offline=False)`: the node vanishes when it receives `stage` (it
  does not handle it) and answers nothing afterwards. `offline=True` plays the SuperLink
  noticing the node is gone: it answers for it with Flower's NODE_UNAVAILABLE error reply,
  whose source is the SuperLink (node id 1), not the node.
- `on_request(hook)` / `on_reply(hook)`: `hook(stage, node_id, message) -> Message | None`
  sees every message on its way to a node / back to the server (a wire copy: change it in
  place or return another one); `None` means the message is lost. A lying server or a
  network attacker is a hook; a late reply is an `on_reply` hook that keeps the message and
  returns None.
- `transcript`: every message as the receiving party saw it (after the hooks), in order:
  `Wire(direction, stage, node_id, message)` with direction `TO_NODE` (a node received and
  handled it; a vanished node receives nothing) or `TO_SERVER`; `received(stage)` /
  `sent(stage)` give {node_id: message} for one stage. `pushed` keeps what the server sent,
  before any hook, and `asked(stage)` the node ids it sent `stage` to.

Timeouts are not simulated: delivery is synchronous, a node that gave no reply is simply
absent from `send_and_receive`'s result. Server-side code builds `Message`s, which needs
Flower's task identity: run it inside `serverapp_identity()`.

Usage:
    with serverapp_identity():
        grid = SecAggGrid([101, 102, 103])
        for nid in grid.node_ids: store_encoded_update(grid.contexts[nid], ...)
        grid.drop(103, "secagg_masked")
        outcome = secure_sum(grid, grid.names, setup, dimension, timeout=30)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.secure_aggregation import handle_stage
from privacy.secagg.identity import SigningIdentity, new_identities

TO_NODE = "to_node"
TO_SERVER = "to_server"
STAGE_PREFIX = "query.secagg_"

Hook = Callable[[str, int, Message], "Message | None"]
NodeHandler = Callable[[str, RecordDict, Context, SigningIdentity], RecordDict]


@contextmanager
def serverapp_identity(run_id: int = 1, task_id: int = 1) -> Iterator[None]:
    """Set Flower's task identity as a ServerApp process has it (source: the SuperLink), then restore it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = run_id, SUPERLINK_NODE_ID, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@dataclass(frozen=True)
class Wire:
    """One message as its receiver saw it. stage: the message type after "query."."""

    direction: str  # TO_NODE or TO_SERVER
    stage: str
    node_id: int  # the node asked (also for a reply the SuperLink wrote for it)
    message: Message


def wire_copy(message: Message) -> Message:
    """The message after a Flower serialisation round trip (what the other side receives)."""
    return message_from_proto(message_to_proto(message))


def stage_of(message: Message) -> str:
    """`query.secagg_masked` -> `secagg_masked`; other types are returned unchanged."""
    kind = message.metadata.message_type
    return kind[len("query."):] if kind.startswith("query.") else kind


@dataclass(eq=False)
class SecAggGrid(Grid):
    """A Grid whose nodes are `node_handler` (default: the node's real SecAgg+ handler) in memory.

    node_ids: the federation's node ids (not 1, the SuperLink's). contexts: node id -> its
    flwr Context, replaced by a new object after each message (read it afresh). Node `nid`
    takes part in SecAgg+ as str(nid) with its signing identity `identities[str(nid)]`
    (fresh ones, one keyring, unless given); `names` is what `secure_sum` takes.
    """

    node_ids: list[int]
    run_id: int = 1
    node_config: dict = field(default_factory=dict)
    run_config: dict = field(default_factory=dict)
    node_handler: NodeHandler = handle_stage
    keep_state_on_error: bool = True
    identities: dict[str, SigningIdentity] | None = None
    contexts: dict[int, Context] = field(init=False)
    transcript: list[Wire] = field(init=False, default_factory=list)
    pushed: list[Message] = field(init=False, default_factory=list)  # what the server sent, before any hook
    undeliverable: list[Message] = field(init=False, default_factory=list)  # refused at push, as the LinkState does
    _drops: dict[int, tuple[str, bool]] = field(init=False, default_factory=dict)
    _gone: dict[int, bool] = field(init=False, default_factory=dict)  # vanished node -> offline?
    _request_hooks: list[Hook] = field(init=False, default_factory=list)
    _reply_hooks: list[Hook] = field(init=False, default_factory=list)
    _waiting: dict[str, Message] = field(init=False, default_factory=dict)  # request id -> reply not yet pulled

    def __post_init__(self) -> None:
        self.node_ids = [int(n) for n in self.node_ids]
        if SUPERLINK_NODE_ID in self.node_ids or len(set(self.node_ids)) != len(self.node_ids):
            raise ValueError(f"node ids must be distinct and not {SUPERLINK_NODE_ID} (the SuperLink's)")
        self.contexts = {
            nid: Context(run_id=self.run_id, node_id=nid, node_config=dict(self.node_config), state=RecordDict(),
                         run_config=dict(self.run_config))
            for nid in self.node_ids
        }
        if self.identities is None:
            self.identities = new_identities([str(n) for n in self.node_ids])

    @property
    def names(self) -> dict[int, str]:
        """Node id -> its protocol id (str(node id)), as `secure_sum` takes it."""
        return {nid: str(nid) for nid in self.node_ids}
        self._run = Run.create_empty(self.run_id)

    # ---- hooks -------------------------------------------------------------------------
    def drop(self, node_id: int, stage: str, offline: bool = False) -> None:
        """`node_id` vanishes on receiving `stage` (e.g. "secagg_masked") and answers nothing after."""
        self._drops[int(node_id)] = (stage, offline)

    def on_request(self, hook: Hook) -> None:
        """Call `hook(stage, node_id, message)` on each message before a node receives it."""
        self._request_hooks.append(hook)

    def on_reply(self, hook: Hook) -> None:
        """Call `hook(stage, node_id, reply)` on each reply before the server receives it."""
        self._reply_hooks.append(hook)

    # ---- transcript --------------------------------------------------------------------
    def received(self, stage: str) -> dict[int, Message]:
        """{node id asked: the reply the server received} at `stage` (the last one if several)."""
        return {w.node_id: w.message for w in self.transcript if w.direction == TO_SERVER and w.stage == stage}

    def sent(self, stage: str) -> dict[int, Message]:
        """{node id: the message it received and handled} at `stage` (the last one if several)."""
        return {w.node_id: w.message for w in self.transcript if w.direction == TO_NODE and w.stage == stage}

    def asked(self, stage: str) -> list[int]:
        """The node ids the server sent `stage` to (whether or not they received it), in order."""
        return [m.metadata.dst_node_id for m in self.pushed if stage_of(m) == stage]

    # ---- flwr Grid ---------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            md = msg.metadata
            if (md.src_node_id != SUPERLINK_NODE_ID or md.run_id != self.run_id or md.reply_to_message_id
                    or md.dst_node_id not in self.contexts):
                self.undeliverable.append(msg)
                continue
            ids.append(md.message_id)
            self.pushed.append(wire_copy(msg))
            reply = self._deliver(wire_copy(msg))
            if reply is not None:
                self._waiting[md.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._waiting.pop(i) for i in list(message_ids) if i in self._waiting]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ---- one node ----------------------------------------------------------------------
    def _deliver(self, request: Message) -> Message | None:
        nid, stage = request.metadata.dst_node_id, stage_of(request)
        for hook in self._request_hooks:
            request = hook(stage, nid, request)
            if request is None:
                return None
        if nid not in self._gone and nid in self._drops and self._drops[nid][0] == stage:
            self._gone[nid] = self._drops[nid][1]
        if nid in self._gone:
            if not self._gone[nid]:
                return None
            reply = create_message_error_unavailable_res_message(request.metadata, "node_unavail")
        else:
            self.transcript.append(Wire(TO_NODE, stage, nid, request))
            reply = self._run_node(nid, stage, request)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        reply = wire_copy(reply)
        for hook in self._reply_hooks:
            reply = hook(stage, nid, reply)
            if reply is None:
                return None
        self.transcript.append(Wire(TO_SERVER, stage, nid, reply))
        return reply

    def _run_node(self, nid: int, stage: str, request: Message) -> Message:
        context = context_from_proto(context_to_proto(self.contexts[nid]))
        try:
            if not request.metadata.message_type.startswith(STAGE_PREFIX):
                raise ValueError(f"no handler for message type {request.metadata.message_type!r}")
            content = self.node_handler(stage, request.content, context, self.identities[str(nid)])
            reply = Message(content, reply_to=request)
        except Exception as ex:  # Flower's runtime turns any exception into an error reply
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=_reason(ex)), reply_to=request)
            if not self.keep_state_on_error:
                return reply
        self.contexts[nid] = context
        return reply


def _reason(ex: BaseException) -> str:
    """Flower's error reason format: "<class 'ValueError'>:<'message'>"."""
    return str(type(ex)) + ":<'" + str(ex) + "'>"
