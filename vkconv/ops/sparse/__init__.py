"""Sparse 3-D convolution (spconv semantics): the tensor (:mod:`.tensor`), the rulebook built on the
device (:mod:`.rulebook`), the compute (:mod:`.conv`), recording helpers (:mod:`.device`) and a
whole encoder in one submit (:mod:`.encoder`)."""
