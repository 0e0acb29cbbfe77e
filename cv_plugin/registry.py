"""Once-per-process registration of vkconv's layer types with ``cv2.dnn``.

Registering a name twice aborts the process, and OpenCV does not keep the class alive, so the
registered names and classes are tracked here for the life of the process.
"""
from __future__ import annotations

import importlib
import threading

from cv_plugin import compat
from cv_plugin.layers import LAYER_TYPES

# Op modules: importing one adds its layer types to LAYER_TYPES and its routes to rewrite.ROUTES.
OP_MODULES = ("cv_plugin.layers", "cv_plugin.deform_layer", "cv_plugin.custom_layers", "cv_plugin.conv_lstm_layer",
              "cv_plugin.sparse_layer", "cv_plugin.subgraph", "cv_plugin.convert")

_registered: dict[str, type] = {}  # keeps every class object alive: OpenCV holds a raw pointer
_lock = threading.Lock()


def register_layer(type_name: str, cls: type) -> None:
    with _lock:
        if _registered.get(type_name) is cls:
            return
        cv2 = compat.cv2_module()
        cv2.dnn_registerLayer(type_name, cls)
        _registered[type_name] = cls


def register() -> None:
    """Register vkconv's layers with ``cv2.dnn`` (idempotent): the ``vkconv.*`` types the rewrite
    writes, and the deformable convolutions OpenCV lacks under the names plain ``cv2.dnn.readNet``
    looks up (:mod:`cv_plugin.custom_layers`).

    Raises VkconvError with one clear sentence when the installed OpenCV cannot host Python layers
    (OpenCV 5.0.0, or older than 4.10).
    """
    compat.check_python_layers(register_layer)
    for module in OP_MODULES:
        importlib.import_module(module)
    for type_name, cls in LAYER_TYPES.items():
        register_layer(type_name, cls)


def unregister() -> None:
    """Remove vkconv's layer types from ``cv2.dnn``; nets loaded afterwards use no vkconv layer.

    The classes stay referenced: nets loaded earlier still hold instances of them.
    """
    with _lock:
        cv2 = compat.cv2_module()
        for type_name in list(_registered):
            if type_name != compat.PROBE_TYPE:
                cv2.dnn_unregisterLayer(type_name)
                del _registered[type_name]


def registered() -> list[str]:
    with _lock:
        return sorted(_registered)
