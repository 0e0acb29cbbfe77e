"""Dense convolution (1-D to 3-D): the op (:mod:`.op`), the kernel classes (:mod:`.kernels`) and
how one is chosen for a shape (:mod:`.selection`)."""
