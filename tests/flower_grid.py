"""An in-process Flower Grid: each message goes straight to a ``ClientApp`` object with a
per-node ``Context`` (node config, persistent ``state``, the run config). No Ray, no processes:
a whole ServerApp run of the tiny model takes seconds. Needs a TaskIdentity (see the
``task_identity`` fixture of test_flower.py) for ``Message`` construction."""
from __future__ import annotations

from typing import Iterable, Optional

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid


class Nodes:
    """The part of a Grid that FedAvg's sampling uses."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


class InProcessGrid(Grid):
    def __init__(self, client_app, node_configs: dict[int, dict], run_config: dict):
        self.client_app = client_app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=dict(cfg), state=RecordDict(),
                                    run_config=dict(run_config))
                         for n, cfg in node_configs.items()}
        self.delivered: list[tuple[int, str]] = []   # (node, message type)
        self._run = None

    # the abstract API, minimally
    @property
    def run(self):
        return self._run

    def set_run(self, run_id: int) -> None:
        self._run = run_id

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.delivered.append((node, msg.metadata.message_type))
            replies.append(self.client_app(msg, self.contexts[node]))
        return replies
