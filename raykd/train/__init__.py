"""Training runs: building a run (:mod:`.build`), the Ray-free loop (:mod:`.loop`), the Ray Train
worker (:mod:`.worker`), the driver (:mod:`.driver`) and its ``TorchTrainer`` helpers
(:mod:`.trainer`), methods' teacher preps (:mod:`.prep`)."""
