"""One file per tuning method MindSpore runs; each defines `METHOD`, its `MindSporeMethod` (see ../method.py).
A file here is the method's registration for MindSpore (`tuneport.frameworks.frameworks_of`)."""
