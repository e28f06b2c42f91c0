"""One file per tuning method torch runs; each defines `METHOD`, its `TorchMethod` (see ../method.py).
A file here is the method's registration for torch (`tuneport.frameworks.frameworks_of`)."""
