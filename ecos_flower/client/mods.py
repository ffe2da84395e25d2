"""Client mods of ecos-flower: torch threads per node, research timing, and Flower's update
clipping where the node's policy answers client-level DP-FedAvg."""

from __future__ import annotations

import os
import time

import numpy as np
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from ecos_flower.client.release import refusal
from ecos_flower.models import set_torch_threads
from ecos_flower.privacy.policy import NodePolicy, PolicyError


def torch_threads_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler with the node's torch thread count: node config `torch-threads`, else the
    run's setting, capped at this machine's cores (several simulated clients on a small machine
    run 50-70x slower when each uses every core)."""
    config = msg.content.get("config") if msg.has_content() else None
    wanted = context.node_config.get("torch-threads")
    if wanted is None and config is not None:
        wanted = config.get("torch-threads", 1)
    try:
        threads = int(wanted or 1)
    except (TypeError, ValueError):
        threads = 1
    set_torch_threads(max(1, min(threads, os.cpu_count() or 1)))
    return call_next(msg, context)


def compute_time_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Research nodes only: add the handler's wall time to the reply as metric `compute-s` (the
    comparison's client compute cost). A private node sends no timing."""
    start = time.perf_counter()
    reply = call_next(msg, context)
    try:
        research = NodePolicy.from_node_config(context.node_config).research
    except PolicyError:
        research = False
    if research and reply.has_content() and isinstance(reply.content.get("metrics"), MetricRecord):
        reply.content["metrics"]["compute-s"] = time.perf_counter() - start
    return reply


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod`, run only where the node's policy answers client-level
    DP-FedAvg (Flower's mod turns any reply without arrays, a refusal included, into an error).

    A zero update (the model sent back unchanged, e.g. by a client whose training diverged)
    needs no clipping and is passed on as it is: Flower's mod divides by the update's norm and
    would raise ZeroDivisionError, and one error reply makes Flower's FedAvg skip the round."""
    try:
        reason = NodePolicy.from_node_config(context.node_config).refusal("clipped-update")
    except PolicyError as exc:
        reason = f"this node's privacy configuration is invalid: {exc}"
    if reason is not None:
        return refusal(msg, reason, context.node_id)

    def handler(inner_msg: Message, inner_context: Context) -> Message:
        reply = call_next(inner_msg, inner_context)
        if _is_zero_update(inner_msg, reply):
            raise _ZeroUpdate(reply)  # leave Flower's mod before it divides by the norm
        return reply

    try:  # Flower's own checks (one ArrayRecord, the clipping norm) run before the handler
        return fixedclipping_mod(msg, context, handler)
    except _ZeroUpdate as zero:
        return zero.reply


class _ZeroUpdate(Exception):
    """Carries a zero-update reply out of Flower's clipping mod (see `dp_clipping_mod`)."""

    def __init__(self, reply: Message) -> None:
        super().__init__("zero update")
        self.reply = reply


def _is_zero_update(msg: Message, reply: Message) -> bool:
    """Whether `reply` sends back exactly the arrays `msg` carried (its only ArrayRecord)."""
    if reply.has_error() or len(msg.content.array_records) != 1:
        return False
    if len(reply.content.array_records) != 1:
        return False
    (sent,) = msg.content.array_records.values()
    (returned,) = reply.content.array_records.values()
    if list(sent) != list(returned):
        return False
    return all(np.array_equal(sent[k].numpy(), returned[k].numpy()) for k in sent)
