"""Studio tabs: layout and wiring only."""
