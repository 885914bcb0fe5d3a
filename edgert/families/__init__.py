"""Model architectures written with `tvm.relax.frontend.nn`, one file per family."""
