"""Relax passes and the pipeline every build uses (`pipeline`), decode attention (`attention`)."""
