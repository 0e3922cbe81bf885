"""The bundled mini world: procedural scenes and styles, the oracle scorer and the mini-SD recipe."""
