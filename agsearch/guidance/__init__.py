"""Guidance: the kernel of formulas (:mod:`.ops`), the controllers that pick ops per step and
sample (:mod:`.controllers`) and the one sampling loop (:mod:`.sampler`)."""
