"""The launch layer: every module that imports Ray (DESIGN.md, "Layers")."""
