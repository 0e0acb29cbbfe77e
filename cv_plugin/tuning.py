"""Tuning the convolutions of a net loaded with :func:`cv_plugin.read_net`.

``read_net(model, tune=True)`` hands ``tune`` to every convolution, transposed convolution,
deformable convolution and ConvLSTM2D of the net (layer mode: each ``vkconv.Conv`` /
``vkconv.ConvTranspose`` / ``vkconv.DeformConv`` / ``vkconv.ConvLSTM2D`` layer's op; subgraph mode:
those inside each device-resident group), and :func:`conv_ops` lists them for ``vkconv tune`` and
``vkconv run --debug``.
"""
from __future__ import annotations

import vkconv
from cv_plugin.conv_lstm_layer import ConvLSTMOp
from cv_plugin.layers import ConvFamilyOp, NetState
from cv_plugin.subgraph import SubgraphOp
from vkconv.graph.steps import PlanStep
from vkconv.ops.tune import tune_mode


def apply(state: NetState, tune: bool | str | None) -> None:
    """Give every tunable convolution of the net ``tune`` (see
    :class:`vkconv.Conv`); ValueError for a bad value."""
    mode = tune_mode(tune)
    for op in state.ops.values():
        if isinstance(op, (ConvFamilyOp, ConvLSTMOp)):
            op.tune = mode
    for _, conv in conv_ops(state):
        conv.tune_mode = mode


TUNABLE = (vkconv.Conv, vkconv.ConvTranspose, vkconv.DeformConv, vkconv.ConvLSTM2D)
Tunable = vkconv.Conv | vkconv.ConvTranspose | vkconv.DeformConv | vkconv.ConvLSTM2D


def conv_ops(state: NetState) -> list[tuple[str, Tunable]]:
    """(name, op) of every ``vkconv.Conv``, ``vkconv.ConvTranspose``, ``vkconv.DeformConv`` and
    ``vkconv.ConvLSTM2D`` the net has built so far (layer mode builds them at the first forward), in
    the net's order; a subgraph's are named ``group/node``.  Each has ``choices()``,
    ``signature()``, ``autotune()`` and ``tune_mode``."""
    found: list[tuple[str, Tunable]] = []
    for key, op in state.ops.items():
        if isinstance(op, ConvFamilyOp) and isinstance(op.device_op, TUNABLE):
            found.append((key, op.device_op))
        elif isinstance(op, ConvLSTMOp) and op.lstm is not None:
            found.append((key, op.lstm))
        elif isinstance(op, SubgraphOp):
            found += [(f"{key}/{node.name or node.outputs[0]}", kernel.op) for node, kernel, _ in op.graph.steps
                      if isinstance(kernel, PlanStep) and isinstance(kernel.op, TUNABLE)]
    return found
