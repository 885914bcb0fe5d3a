"""Neural audio codecs (edgert's own, EnCodec, Mimi): `model`, `mimi`, `build`, `stream` (runtime), `device`."""
