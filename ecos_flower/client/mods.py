"""Client mods of ecos-flower: torch threads per node, research timing, and Flower's update
clipping where the node's policy answers client-level DP-FedAvg."""

from __future__ import annotations

import os
import time

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
    DP-FedAvg (Flower's mod turns any reply without arrays, a refusal included, into an error)."""
    try:
        reason = NodePolicy.from_node_config(context.node_config).refusal("clipped-update")
    except PolicyError as exc:
        reason = f"this node's privacy configuration is invalid: {exc}"
    if reason is not None:
        return refusal(msg, reason, context.node_id)
    return fixedclipping_mod(msg, context, call_next)
