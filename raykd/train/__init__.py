"""Training runs: a Ray-free loop (:mod:`.loop`), the Ray Train worker and the driver."""
