"""Tuning the convolutions and loop kernels of a net loaded with :func:`cv_plugin.read_net`.

``read_net(model, tune=True)`` hands ``tune`` to every convolution, transposed convolution,
deformable convolution and ConvLSTM2D of the net (layer mode: each ``vkconv.Conv`` /
``vkconv.ConvTranspose`` / ``vkconv.DeformConv`` / ``vkconv.ConvLSTM2D`` layer's op; subgraph mode:
those inside each device-resident group, and the groups' loop kernels), and :func:`conv_ops` lists
them for ``vkconv tune`` and ``vkconv run --debug``; :func:`loop_ops` lists the loop kernels
(elementwise, pool, resize, transpose) of the subgraphs, whose launch shapes ``vkconv tune``
measures too (:mod:`vkconv.ops.launch`).
"""
from __future__ import annotations

import vkconv
from cv_plugin.conv_lstm_layer import ConvLSTMOp
from cv_plugin.layers import ConvFamilyOp, NetState
from cv_plugin.subgraph import SubgraphOp
from vkconv.graph.steps import PlanStep
from vkconv.ops.launch import LoopLaunch
from vkconv.ops.tune import tune_mode


def apply(state: NetState, tune: bool | str | None) -> None:
    """Give every tunable convolution of the net, and every loop kernel of its subgraphs, ``tune``
    (see :class:`vkconv.Conv`, :class:`vkconv.ops.launch.LoopLaunch`); ValueError for a bad value."""
    mode = tune_mode(tune)
    for op in state.ops.values():
        if isinstance(op, (ConvFamilyOp, ConvLSTMOp)):
            op.tune = mode
    for _, conv in conv_ops(state):
        conv.tune_mode = mode
    for _, loop in loop_ops(state):
        loop.tune = mode


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


def loop_ops(state: NetState) -> list[tuple[str, LoopLaunch]]:
    """(``group/node``, op) of every loop-kernel step of the net's subgraphs, in the net's order;
    after a forward, the ``last_launch`` of each that recorded a loop dispatch holds its kernel,
    item count and input shapes for :func:`vkconv.ops.launch.tune_launch`."""
    return [(f"{key}/{node.name or node.outputs[0]}", kernel) for key, op in state.ops.items()
            if isinstance(op, SubgraphOp) for node, kernel, _ in op.graph.steps
            if isinstance(kernel, LoopLaunch)]
