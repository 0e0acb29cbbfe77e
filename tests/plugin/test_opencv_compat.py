"""The installed OpenCV either hosts vkconv's layers or is refused with one clear sentence."""
from __future__ import annotations

import numpy as np
import pytest

import cv_plugin
import vkconv
from cv_plugin import compat
from cv_plugin.bench import soak

MAJOR = compat.cv2_version()[0]


@pytest.mark.skipif(MAJOR >= 5, reason="OpenCV 5.x is refused (tested below)")
def test_opencv4_hosts_python_layers():
    cv_plugin.register()
    assert "vkconv.Conv" in cv_plugin.registered()


@pytest.mark.skipif(MAJOR < 5, reason="only OpenCV 5.x is expected to fail the probe")
def test_opencv5_is_refused_clearly():
    with pytest.raises(vkconv.VkconvError, match=r"OpenCV 5\.\S+ cannot host vkconv's Python layers.*<5"):
        cv_plugin.register()
    with pytest.raises(vkconv.VkconvError, match="cannot host"):
        cv_plugin.read_net(soak.small_net())


def test_nd_mat_keeps_three_dimensions():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    wrapped = compat.as_nd_mat(x)
    assert wrapped.shape == (2, 3, 4) and np.array_equal(np.asarray(wrapped), x)
    assert compat.as_nd_mat(wrapped) is wrapped
