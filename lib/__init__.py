"""The model-agnostic experiment harness (see DESIGN.md in shared/)."""
