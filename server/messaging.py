"""Request/reply exchanges with nodes over Flower's Grid, keyed by the node asked.

Why not `reply.metadata.src_node_id`: when a node goes offline mid-round, the SuperLink
answers on its behalf with an error reply whose source is the SuperLink itself, so the
reply must be matched to its request (`reply_to_message_id`) to know which node failed.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> dict[int, Message]:
    """Send `messages`, wait up to `timeout` seconds; returns {destination node id: its reply}.

    Nodes that did not answer in time are absent. `Grid.send_and_receive` stamps each
    message with its id when it is pushed, which is what the replies refer to.
    """
    messages = list(messages)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    by_node = {}
    for reply in replies:
        nid = asked.get(reply.metadata.reply_to_message_id) if reply.metadata.reply_to_message_id else None
        by_node[reply.metadata.src_node_id if nid is None else nid] = reply
    return by_node
