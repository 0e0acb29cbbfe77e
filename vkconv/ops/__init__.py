"""The numpy-facing ops.  Each op module sits beside its shaders (``shaders/<family>/``) and is
built on :mod:`vkconv.ops.base` (context, plan cache, lock, resident weights, checks)."""
